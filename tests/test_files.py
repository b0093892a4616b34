"""harness/files.py: an output file appears whole, on success only, and a bad output path is one HarnessError."""

from __future__ import annotations

import os

import pytest

from harness.errors import HarnessError
from harness.files import atomic_path


def test_the_file_appears_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "out.json"
    with atomic_path(target) as tmp:
        assert tmp == tmp_path / f".out.json.{os.getpid()}.tmp"
        tmp.write_text("new")
        assert not target.exists()
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_failing_block_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("midway")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


@pytest.mark.parametrize(
    "path, message",
    [
        ("nope/out.json", "{tmp}/nope/out.json: output folder {tmp}/nope does not exist; create it first"),
        ("plain.txt/out.json", "{tmp}/plain.txt/out.json: {tmp}/plain.txt is a file, not a folder"),
        ("folder", "{tmp}/folder: is a folder, expected a file name"),
    ],
    ids=["missing-folder", "under-a-file", "a-folder"],
)
def test_a_bad_output_path_is_refused_before_anything_is_written(tmp_path, path, message):
    (tmp_path / "plain.txt").write_text("mine")
    (tmp_path / "folder").mkdir()
    with pytest.raises(HarnessError) as info:
        with atomic_path(tmp_path / path):
            pytest.fail("the block must not run")
    assert str(info.value).startswith(message.format(tmp=tmp_path)), info.value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "plain.txt"]
