"""Regression gate: today's from-scratch traces of the tiny checkpoints against golden/ under a tight bound.

golden/ changes only through `python -m harness golden --update`; this test never writes there.
"""

from __future__ import annotations

import pytest

from harness import golden
from harness.report import summary_line

PROMPT, ENTRIES = golden.read_recipe()


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.id for e in ENTRIES])
def test_golden(entry, tmp_path):
    comparison = golden.check_entry(entry, tmp_path)  # today's trace and its tiny checkpoint made under tmp_path
    if not comparison.passed:
        first = comparison.result(comparison.first_divergence)
        pytest.fail(
            f"{entry.id}: the forward's numbers changed since golden/{entry.file} was written\n"
            f"  first divergence: {comparison.first_divergence} "
            f"(rel_l2 {first.rel_l2:.3g} vs bound {first.bound:.3g})\n"
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
