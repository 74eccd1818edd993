"""The one atomic-write policy: temporary name beside the target, fsync, rename."""

import json
from pathlib import Path

import pytest

from particleseg_model.atomic import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    is_temporary,
    temporary_name,
)


def test_temporary_names_are_hidden_siblings(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    a, b = temporary_name(target), temporary_name(target)
    assert a.parent == tmp_path and a != b
    assert a.name.startswith(".manifest.json.") and is_temporary(a)
    assert not is_temporary(target)


def test_write_replaces_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.json"
    atomic_write_json(target, {"a": 1, "path": tmp_path})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = atomic_write_text(tmp_path / "labels.txt", "old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.txt"]


def test_a_block_that_writes_nothing_is_an_error(tmp_path: Path) -> None:
    with (
        pytest.raises(FileNotFoundError, match="nothing was written"),
        atomic_path(tmp_path / "x.mrc"),
    ):
        pass
    assert not (tmp_path / "x.mrc").exists()
