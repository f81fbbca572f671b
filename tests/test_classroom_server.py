"""docs/classroom-server.md builds the same environment as binder/ (the same requirements, the same
Python, binder/start's settings), and its configurations parse and carry the measured sizing."""

import re
import shlex

import budget_docs
import yaml

from scripts import sync_notebooks as links

BINDER = budget_docs.ROOT / "binder"
PAGE = budget_docs.DOCS / "classroom-server.md"


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), re.DOTALL)


def _commands() -> list[list[str]]:
    """The shell commands of the page, continuation lines joined, comments dropped."""
    text = "\n".join(_code_blocks("bash")).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.split("#")[0].strip()]


def test_the_same_python_as_binder():
    wanted = (BINDER / "runtime.txt").read_text().strip().removeprefix("python-")
    pythons = re.findall(r"python=(\d+\.\d+)", PAGE.read_text())
    assert pythons and set(pythons) == {wanted}


def test_the_same_requirements_and_build_steps_as_binder():
    commands = _commands()
    installs = [c for c in commands if any(w.endswith("pip") for w in c) and "-r" in c]
    assert installs and all(c[c.index("-r") + 1] == "binder/requirements.txt" for c in installs)
    assert any("binder/postBuild" in c for c in commands)  # the model converted, a CUDA torch refused
    build = next(c for c in commands if c[0] == "jupyter-repo2docker")  # Z2JH: repo2docker reads binder/
    clone = next(c for c in commands if c[1:3] == ["git", "clone"])  # TLJH: a clone of the same repository
    assert build[-1] == clone[3] == f"https://github.com/{links.repository()}"  # pyproject's [project.urls]


def test_the_kernel_carries_binder_starts_settings():
    start = (BINDER / "start").read_text()
    settings = dict(pair.split("=", 1) for line in start.splitlines() if line.startswith("export ")
                    for pair in line.split()[1:])
    kernel = next(c for c in _commands() if "-m" in c and c[c.index("-m") + 1:c.index("-m") + 3] == [
        "ipykernel", "install"])
    given = {kernel[i + 1]: kernel[i + 2] for i, word in enumerate(kernel) if word == "--env"}
    assert settings and {k: given.get(k) for k in settings} == settings
    assert kernel[kernel.index("--name") + 1] == "python3"  # the kernel every notebook asks for


def test_z2jh_config_parses_and_carries_the_measured_sizing():
    config = yaml.safe_load(_code_blocks("yaml")[0])["singleuser"]
    sizing = budget_docs.sizing(budget_docs.load())
    assert config["memory"] == {"guarantee": f"{sizing['guarantee_gb']:g}G",
                                "limit": f"{sizing['limit_gb']:g}G"}
    hook = config["lifecycleHooks"]["postStart"]["exec"]["command"]
    assert hook[:2] == ["python", "-c"] and compile(hook[2], "postStart", "exec")
    assert config["storage"]["homeMountPath"] == "/home/jovyan/work"  # below the image's home: see the page
    assert config["defaultUrl"] == "/lab/tree/work/llama-lab"
