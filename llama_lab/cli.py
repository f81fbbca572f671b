"""The `llama-lab` command: `doctor` checks a machine, `lab` opens the notebooks,
`generate` answers a prompt from the terminal, `serve` answers over HTTP, `pack` writes an offline
room's wheels to a folder, `solutions` the solved notebooks for instructors."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

SHOWN_PACKAGES = ["torch", "transformers", "accelerate", "peft", "gguf", "ipywidgets", "jupyterlab"]
def _tested_ranges() -> dict[str, SpecifierSet]:
    """The version ranges this install of llama-lab declares (from its own metadata)."""
    try:
        meta = importlib.metadata.metadata("llama-lab")
    except importlib.metadata.PackageNotFoundError:
        return {}
    ranges = {"python": SpecifierSet(meta.get("Requires-Python") or "")}
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None:
            ranges[req.name.lower()] = req.specifier
    return ranges


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _row(ok: bool | None, label: str, text: str, marks: tuple[str, str] = ("ok", "FAIL")) -> str:
    mark = {True: marks[0], False: marks[1], None: "--"}[ok]
    return f"  [{mark:<4}] {label:<24} {text}"


def _software_rows() -> tuple[list[str], list[str]]:
    ranges, rows, fixes = _tested_ranges(), [], []
    python = platform.python_version()
    ok = python in ranges["python"] if "python" in ranges else None
    rows.append(_row(ok, "Python", f"{python}  (needs {ranges.get('python', 'any')})"))
    for package in SHOWN_PACKAGES:
        version, spec = _version(package), ranges.get(package)
        if version is None:
            rows.append(_row(False, package, "not installed"))
            fixes.append(f"pip install '{package}{spec or ''}'")
            continue
        ok = None if spec is None else spec.contains(version.split("+")[0], prereleases=True)
        rows.append(_row(ok, package, f"{version}  (needs {spec or 'any'})"))
        if ok is False:
            fixes.append(f"pip install '{package}{spec}'")
    return rows, fixes


def _notebooks_row() -> tuple[str, list[str]]:
    """The notebooks this install carries (a wheel's copy, or a clone's notebooks/)."""
    from llama_lab import launch

    source = launch.shipped_notebooks()
    found = sorted(source.glob("*.ipynb"))
    if not found:
        return _row(False, "notebooks", f"none in {source}"), [
            "reinstall llama-lab (README: Start): this install carries no notebooks"]
    return _row(True, "notebooks", f"{len(found)}, from {found[0].name} to {found[-1].name} "
                f"(`llama-lab lab` opens copies in {launch.default_folder()})"), []


def _machine_rows() -> tuple[list[str], float]:
    import torch

    from llama_lab.hardware import SMALL_TRACK_BYTES
    from llama_lab.models import available_memory

    ram = available_memory("cpu")
    rows = [_row(None, "CPU cores", str(os.cpu_count())),
            _row(ram >= SMALL_TRACK_BYTES, "free RAM", f"{ram / 1e9:.1f} GB{_memory_limit_note()}")]
    if torch.cuda.is_available():
        vram = available_memory("cuda")
        rows.append(_row(None, "GPU", f"{torch.cuda.get_device_name(0)}, {vram / 1e9:.1f} GB free"))
    else:
        rows.append(_row(None, "GPU", "none (torch sees no CUDA device)"))
    return rows + [_compiler_row()], ram


def _memory_limit_note() -> str:
    """Which limit bounds the free RAM, when it is not the machine's own (a container, Binder)."""
    from llama_lab.models import memory_limits

    limits = memory_limits()
    tightest = min(limits, key=lambda limit: limit.free)
    if tightest.source == "system RAM":
        return ""
    return (f"  (bounded by {tightest.source}: a limit of {tightest.limit / 1e9:.1f} GB; "
            f"the machine itself has {limits[0].free / 1e9:.1f} GB free)")


def _compiler_row() -> str:
    from llama_lab.compiled_decode import require_cpp_compiler
    from llama_lab.errors import CompilerNotFoundError

    try:
        text, ok = f"{require_cpp_compiler()}  (torch.compile: notebook 04, compiled_decode)", True
    except CompilerNotFoundError:
        text, ok = "missing: notebook 04's compiled product needs it (apt install g++ python3-dev)", False
    return _row(ok, "C++ compiler", text, ("ok", "none"))


def _model_rows() -> tuple[list[str], list[str]]:
    """Load the default model and run one forward pass."""
    import torch

    from llama_lab.models import default_model_name, load_model

    name = default_model_name()
    try:
        start = time.perf_counter()
        model, tokenizer = load_model(name, device="cpu")
        ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
        with torch.no_grad():
            next_id = model(ids).logits[0, -1].argmax().item()
        seconds = time.perf_counter() - start
    except Exception as err:  # any failure here is what the doctor must report
        fix = str(err).splitlines()[0]
        return [_row(False, f"model {name}", f"{type(err).__name__}: {fix}")], [fix]
    word = tokenizer.decode([next_id]).strip()
    return [_row(True, f"model {name}", f"loads and runs in {seconds:.1f} s (next word: {word!r})")], []


def _token_row() -> str:
    from huggingface_hub import get_token

    present = get_token() is not None  # the value itself is never shown
    return _row(None, "Hugging Face token", "present" if present else
                "none (needed only for the Llama 2 models: hf auth login)")


def _track_rows(ram: float, model_ok: bool) -> list[str]:
    """The small model's row, then the track `hardware.pick_track` chooses for Llama-2-13B, and why."""
    from llama_lab.hardware import SMALL_TRACK_BYTES, pick_track

    track = pick_track()
    return [_row(model_ok and ram >= SMALL_TRACK_BYTES, "small model on CPU",
                 f"every notebook's CPU part (needs ~{SMALL_TRACK_BYTES / 1e9:.1f} GB RAM)", ("yes", "no")),
            _row(track.fits, "13B track", str(track), ("ok", "no"))]


def doctor() -> int:
    """Print one screen about this machine; 0 when the default (small model) track works."""
    from llama_lab.hardware import SMALL_TRACK_BYTES

    print("llama-lab doctor: paste this screen when you ask for help.\n\nSoftware")
    soft_rows, fixes = _software_rows()
    notebooks_row, notebooks_fixes = _notebooks_row()
    print("\n".join([*soft_rows, notebooks_row]))
    fixes += notebooks_fixes
    print("\nMachine")
    machine_rows, ram = _machine_rows()
    print("\n".join(machine_rows))
    print("\nModels")
    model_rows, model_fixes = _model_rows()
    print("\n".join(model_rows + [_token_row()]))
    print("\nTracks")
    print("\n".join(_track_rows(ram, not model_fixes)))
    fixes += model_fixes
    if ram < SMALL_TRACK_BYTES:
        fixes.append(f"free some memory: the notebooks need ~{SMALL_TRACK_BYTES / 1e9:.1f} GB, "
                     f"{ram / 1e9:.1f} GB is free (close other programs or notebooks)")
    if fixes:
        print("\nNot ready. To fix:\n" + "\n".join(f"  - {fix}" for fix in fixes))
        return 1
    print("\nReady: the notebooks run on this machine.")
    return 0


def lab(folder: Path | None, fresh: bool, extra: list[str]) -> int:
    """Copy the notebooks into a working folder (first use, or new ones) and open JupyterLab there."""
    from llama_lab import launch

    if importlib.util.find_spec("jupyterlab") is None:
        print("JupyterLab is not installed: pip install jupyterlab", file=sys.stderr)
        return 1
    flags = launch.root_flags(extra)
    if flags is None:
        print(launch.ROOT_REFUSAL, file=sys.stderr)
        return 1
    folder = (folder or launch.default_folder()).expanduser()
    print(launch.summary(folder, launch.copy_notebooks(folder, fresh)), flush=True)
    if flags:
        print("Running as root in a container where no other user runs anything: with --allow-root.")
    argv = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={folder}", *flags, *extra]
    os.execv(sys.executable, argv)
    return 0  # not reached: execv replaces this process


def generate(prompt: str, model_name: str | None, max_new_tokens: int) -> int:
    """Answer one chat prompt greedily with transformers' generate."""
    from llama_lab.errors import LlamaLabError
    from llama_lab.models import load_model

    try:
        model, tokenizer = load_model(model_name)
    except LlamaLabError as err:
        print(err, file=sys.stderr)
        return 1
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


def serve(model_name: str | None, host: str, port: int, api_key: str | None) -> int:
    """Serve a model with the OpenAI-compatible API of `llama_lab.serve` on waitress, until Ctrl+C."""
    import logging

    from llama_lab import serve as serving
    from llama_lab.errors import LlamaLabError
    from llama_lab.models import default_model_name, load_model

    name = model_name or default_model_name()
    try:
        model, tokenizer = load_model(name)
    except LlamaLabError as err:
        print(err, file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = serving.make_server(serving.create_app(model, tokenizer, model_name=name, api_key=api_key),
                                 host, port)
    if warning := serving.exposure_warning(host, api_key):
        print(warning, file=sys.stderr)
    local = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    url = f"http://{local}:{server.effective_port}"
    key = f" It needs the API key (from ${serving.API_KEY_ENV} or --api-key)." if api_key else ""
    print(f"Serving {name} on {url} (OpenAI-compatible API at {url}/v1).{key} Ctrl+C stops it.\n\n"
          f"Paste into Python:\n\n{serving.client_snippet(url, name, api_key=bool(api_key))}\n", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def pack(folder: Path, platform_tag: str | None, python_version: str | None, only_deps: list[str] | None,
         torch_from: str) -> int:
    """Write an offline pack (`llama_lab.pack`) and print the commands that install from it."""
    from llama_lab import pack as packing
    from llama_lab.errors import PackError

    target = packing.Target(platform_tag, python_version)
    print(f"Packing llama-lab for {target} into {folder} (a full pack downloads about 1 GB) ...", flush=True)
    try:
        result = packing.pack(folder.resolve(), target, only_deps, torch_from)
    except PackError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"{len(result.wheels)} wheels, the notebooks and a README in {result.folder}.\n"
          "On a laptop with no network, in a fresh virtual environment:\n")
    print("\n".join(f"  {command}" for command in result.install_commands()))
    return 0


def solutions(folder: Path, run: bool) -> int:
    """Write every notebook with its exercises solved (`llama_lab.solved`), run them, report."""
    from llama_lab import launch, solved

    print(f"Writing the solved notebooks to {folder}" + (" and running them (a few minutes each) ..." if run
                                                          else " (not run)"), flush=True)
    report = solved.write_solved(launch.shipped_notebooks(), folder.resolve(), run)
    failed = [name for name, (n, lines) in report.items() if run and not solved.passed(n, lines)]
    for name, (n, lines) in report.items():
        verdict = "all passed" if name not in failed else "FAILED: " + "; ".join(lines)
        verdict = verdict if run else "written"
        print(f"  {name}: {n} exercises, {verdict}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="check this machine for the workshop")
    lab_parser = sub.add_parser("lab", allow_abbrev=False,
                                help="copy the notebooks into a working folder and open JupyterLab there "
                                     "(other arguments go to jupyter lab)")
    lab_parser.add_argument("--dir", type=Path, default=None,
                            help="the working folder (default ~/llama-lab); edited notebooks are kept")
    lab_parser.add_argument("--fresh", action="store_true",
                            help="clean copies of every notebook; edited ones are kept beside them, renamed")
    gen = sub.add_parser("generate", help="answer a prompt with a model")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="a model name (default: $LLAMA_LAB_MODEL or smollm2-135m)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    srv = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible API and /predict)")
    srv.add_argument("--model", default=None, help="a model name (default: $LLAMA_LAB_MODEL or smollm2-135m)")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    srv.add_argument("--api-key", default=os.environ.get("LLAMA_LAB_API_KEY"),
                     help="require this key from clients (default: $LLAMA_LAB_API_KEY; prefer the variable: "
                          "a key on the command line shows in `ps` and in the shell's history)")
    pck = sub.add_parser("pack", help="write the wheels, the model and the notebooks to a folder for "
                                      "rooms without network (a USB stick)")
    pck.add_argument("dir", type=Path)
    pck.add_argument("--platform", default=None,
                     help="the target's pip platform tag (default this machine's), e.g. "
                          "manylinux_2_28_x86_64, macosx_11_0_arm64, win_amd64")
    pck.add_argument("--python-version", default=None,
                     help="the target's Python, e.g. 3.12 (default this one)")
    pck.add_argument("--only-deps", nargs="*", default=None, metavar="NAME",
                     help="pack only these dependencies, for machines that have the rest (default all)")
    pck.add_argument("--torch-from", default="https://download.pytorch.org/whl/cpu",
                     help="the index (or a folder of wheels) for torch's CPU build")
    sol = sub.add_parser("solutions", help="for instructors: write every notebook with its exercises solved, "
                                           "and run the copies")
    sol.add_argument("dir", type=Path)
    sol.add_argument("--no-run", action="store_true", help="write the copies without running them")
    args, extra = parser.parse_known_args(argv)
    if args.command not in ("lab", "pack", "solutions"):
        from llama_lab.notebook import setup

        setup()  # quiet logs, no progress bars, fixed seeds
    if args.command == "doctor":
        return doctor()
    if args.command == "lab":
        return lab(args.dir, args.fresh, extra)
    if args.command == "pack":
        return pack(args.dir, args.platform, args.python_version, args.only_deps, args.torch_from)
    if args.command == "solutions":
        return solutions(args.dir, not args.no_run)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "serve":
        return serve(args.model, args.host, args.port, args.api_key)
    return generate(args.prompt, args.model, args.max_new_tokens)


if __name__ == "__main__":
    sys.exit(main())
