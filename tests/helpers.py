"""What the tests share: one assert helper over torch.testing.assert_close, so a failure names what was compared; one
compute-once helper for session fixtures (pytest-xdist's FileLock recipe); the generation tests' verdict helpers."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from harness.compare import compare_traces
from harness.errors import HarnessError
from harness.generation import trace_generation
from harness.implementation import resolve
from harness.trace_file import load_trace


def assert_expected(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float = 0.0, atol: float = 0.0, what: str = ""
) -> None:
    """`actual` equals `expected` within rtol/atol (exactly by default); the message names `what` and both shapes."""
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol, check_dtype=False, msg=lambda m: f"{what}: {m}" if what else m
    )


def compute_once(tmp_path_factory, worker_id: str, key: str, compute: Callable[[Path], Any]) -> Any:
    """`compute(folder)` -> a JSON-able value, computed once per test session whatever the number of xdist workers.

    pytest-xdist's recipe for a session fixture: without workers (`worker_id == "master"`) it computes directly, and
    the calling fixture's cache keeps the value; with workers, the first to take the lock computes into the folder all
    workers share (`getbasetemp().parent`) and writes the value beside it, the others read it. Mark the tests that share
    a value with one `xdist_group`, so that one worker computes it while the others run something else. The value goes
    through JSON either way, so both modes hand the tests the same types (a tuple comes back as a list).
    """
    if worker_id == "master":
        return json.loads(json.dumps(compute(tmp_path_factory.mktemp(key))))
    root = tmp_path_factory.getbasetemp().parent  # shared by every worker of this session
    done = root / f"{key}.json"
    with FileLock(str(done) + ".lock"):
        if done.is_file():
            return json.loads(done.read_text())
        folder = root / key
        folder.mkdir(exist_ok=True)  # a worker that failed half-way left it behind: compute again over it
        value = json.loads(json.dumps(compute(folder)))
        done.write_text(json.dumps(value))
    return value


# ---- generation: a prefill and decode steps (tests/test_generation.py, examples/tests/test_generate.py) -------------

GENERATION_STEPS = 3  # decode steps after the prefill in conftest.py's `generation_references`


def assert_passes(comparison, what: str, results=None) -> None:
    """Every name passes: the prefill, each decode step (one query row per head, pooled with the step's heads and held
    to the floor its scores and the cache's values imply) and the cache check. `results`: NameResults to check instead
    of `comparison`'s (e.g. a verify's comparison and cache check together)."""
    failed = [r for r in (comparison.results if results is None else results) if not r.passed]
    assert not failed, (
        f"{what}: {len(failed)} names fail, first {failed[0].name} at {failed[0].ratio:.3g}x the bound "
        f"(rel_l2 {failed[0].rel_l2:.3g}, floor {failed[0].floor})"
    )


def first_failure(run, reference: Path, out: Path, impl="scratch") -> tuple[str | None, str]:
    """(name, how): the first name the implementation fails at, by the shape check or the comparison."""
    try:
        with load_trace(reference) as ref:
            trace_generation(run, resolve(impl), out, reference=ref)
    except HarnessError as e:
        m = re.search(r"recorded '([^']+)' with shape", str(e))
        return (m[1] if m else None), str(e)
    return compare_traces(reference, out).first_divergence, "comparison"


def record_without_reference(golden_dir: Path, impl: str, checkpoint: Path, dtype: str = "float32") -> Path:
    """A golden set as `golden record` writes it, its verification replaced by the trace against itself: no reference
    run (the fast tests of golden sets and of the plugin's --llama3-golden)."""
    from harness import golden_set
    from harness.checkpoint import open_checkpoint
    from harness.compare import compare_traces, write_json
    from harness.implementation import resolve
    from harness.run import DEFAULT_PROMPT, make_run, trace
    from harness.tiny import read_recipe
    from harness.verify import VerifyResult

    ckpt = open_checkpoint(checkpoint)
    staging = golden_dir.parent / f".{golden_dir.name}.verify"
    staging.mkdir()
    today = staging / "implementation.h5"
    trace(make_run(ckpt, dtype=dtype), resolve(impl), today)
    comparison = compare_traces(today, today, rtol=0.0, atol=0.0)
    write_json(comparison, staging / "comparison.json")
    verification = VerifyResult(comparison, staging, impl, today, 0, 0, "", "")
    tiny = read_recipe(ckpt.path)
    golden_set.write(golden_dir, verification, ckpt, tiny=tiny, prompt=DEFAULT_PROMPT, dtype=dtype, device="cpu")
    shutil.rmtree(staging)
    return golden_dir
