"""Regression gate: today's from-scratch traces of the tiny checkpoints against golden/ under a tight bound.

golden/ changes only through `python -m harness golden --update`; this test never writes there.
"""

from __future__ import annotations

import pytest
from filelock import FileLock

from harness import golden
from harness.report import summary_line

PROMPT, ENTRIES = golden.read_recipe()


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.id for e in ENTRIES])
def test_golden(entry, shared_dir):
    work = shared_dir / "golden-today"
    work.mkdir(exist_ok=True)
    with FileLock(str(work / f".{entry.id}.lock")):
        comparison = golden.check_entry(entry, work, tiny_root=shared_dir / "tiny")
    if not comparison.passed:
        first = comparison.result(comparison.first_divergence)
        pytest.fail(
            f"{entry.id}: the forward's numbers changed since golden/{entry.file} was written\n"
            f"  first divergence: {comparison.first_divergence} (rel_l2 {first.rel_l2:.3g} vs bound {first.bound:.3g})\n"
            f"  {summary_line(comparison)}\n"
            f"  if the change is intended: python -m harness golden --update (and commit golden/)",
            pytrace=False,
        )


def test_manifest_describes_every_golden_file():
    manifest = golden.read_manifest()
    assert manifest["produced_by"] == "python -m harness golden --update"
    assert sorted(manifest["files"]) == sorted(e.file for e in ENTRIES)
    for entry in ENTRIES:
        assert golden.sha256(golden.GOLDEN_DIR / entry.file) == manifest["files"][entry.file]["sha256"], entry.file
    assert {"torch", "h5py", "python"} <= set(manifest["library_versions"])
