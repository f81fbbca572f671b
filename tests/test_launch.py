"""`llama-lab lab` from any directory: the notebooks travel in the wheel, are copied into a working
folder without ever overwriting an edited copy, and JupyterLab starts for root where that is safe."""

import json
import zipfile

import pytest

from llama_lab import cli, launch
from tests.fresh import build_wheel

SHIPPED = sorted(p.name for p in launch.shipped_notebooks().glob("*.ipynb"))


def test_the_wheel_carries_every_notebook(tmp_path):
    names = zipfile.ZipFile(build_wheel(tmp_path)).namelist()
    folder = "llama_lab/notebooks/"
    assert sorted(n.removeprefix(folder) for n in names if n.startswith(folder)) == SHIPPED
    assert len(SHIPPED) >= 6


def test_an_untouched_copy_is_updated_and_an_edited_one_kept(tmp_path):
    assert set(launch.copy_notebooks(tmp_path).values()) == {"copied"}
    assert set(launch.copy_notebooks(tmp_path).values()) == {"up to date"}
    old, edited = SHIPPED[0], SHIPPED[1]
    (tmp_path / old).write_text("an older release's notebook")  # as copied by an older llama-lab
    manifest = tmp_path / launch.MANIFEST
    written = json.loads(manifest.read_text())
    written[old] = launch._digest(tmp_path / old)
    manifest.write_text(json.dumps(written))
    (tmp_path / edited).write_text("the learner's answers")
    report = launch.copy_notebooks(tmp_path)
    assert report[old] == "updated" and report[edited] == "kept (edited)"
    assert (tmp_path / old).read_bytes() == (launch.shipped_notebooks() / old).read_bytes()
    assert (tmp_path / edited).read_text() == "the learner's answers"
    assert "llama-lab lab --fresh" in launch.summary(tmp_path, report)


def test_fresh_puts_clean_copies_in_place_and_keeps_the_edited_one(tmp_path):
    launch.copy_notebooks(tmp_path)
    (tmp_path / SHIPPED[0]).write_text("the learner's answers")
    report = launch.copy_notebooks(tmp_path, fresh=True)
    [saved] = tmp_path.glob("*.edited-*.ipynb")
    assert report[SHIPPED[0]] == f"replaced (your copy saved as {saved.name})"
    assert saved.read_text() == "the learner's answers"
    assert (tmp_path / SHIPPED[0]).read_bytes() == (launch.shipped_notebooks() / SHIPPED[0]).read_bytes()


@pytest.fixture
def as_root(monkeypatch):
    monkeypatch.setattr(launch.os, "geteuid", lambda: 0, raising=False)
    calls = []
    monkeypatch.setattr(cli.os, "execv", lambda path, argv: calls.append(argv))
    return calls


def test_root_on_a_shared_machine_is_told_what_to_do(as_root, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(launch, "in_container", lambda: False)
    assert cli.main(["lab", "--dir", str(tmp_path)]) == 1
    assert as_root == [] and "llama-lab lab --allow-root" in capsys.readouterr().err
    assert cli.main(["lab", "--dir", str(tmp_path), "--allow-root"]) == 0  # the user said so
    assert as_root[0][-1] == "--allow-root"


def test_root_alone_in_a_container_starts_with_allow_root(as_root, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(launch, "in_container", lambda: True)
    monkeypatch.setattr(launch, "other_users_running", lambda: False)
    assert cli.main(["lab", "--dir", str(tmp_path)]) == 0
    assert as_root[0][-1] == "--allow-root" and "--allow-root" in capsys.readouterr().out
    monkeypatch.setattr(launch, "other_users_running", lambda: True)
    assert cli.main(["lab", "--dir", str(tmp_path)]) == 1  # someone else is on this machine


def test_doctor_shows_the_notebooks_and_says_when_there_are_none(monkeypatch, tmp_path, capsys):
    assert cli.main(["doctor"]) == 0
    assert f"[ok  ] notebooks                {len(SHIPPED)}, from {SHIPPED[0]}" in capsys.readouterr().out
    monkeypatch.setattr(launch, "shipped_notebooks", lambda: tmp_path)
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] notebooks" in out and "this install carries no notebooks" in out
