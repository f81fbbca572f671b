"""The wheel carries the notebooks: they are copied into `llama_lab/notebooks/` as the package is built,
so `pip install llama-lab` brings them and `llama-lab lab` finds them (`llama_lab.lessons`).
Everything else about the package is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithNotebooks(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the clone's notebooks/ folder itself
            return
        target = Path(self.build_lib, "llama_lab", "notebooks")
        self.mkpath(str(target))
        for notebook in sorted(Path("notebooks").glob("*.ipynb")):
            self.copy_file(str(notebook), str(target / notebook.name))


setup(cmdclass={"build_py": BuildWithNotebooks})
