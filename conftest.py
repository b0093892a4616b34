"""Fixtures shared by tests/ and examples/tests/: tiny checkpoints and traces made once per test session, never
downloaded. The suite's options and fixtures come from the pytest plugin (harness/pytest_plugin.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import harness
from harness.checkpoint import open_checkpoint
from harness.generation import trace_generation
from harness.implementation import builtin
from harness.run import DEFAULT_PROMPT, make_run, trace_reference, trace_scratch
from harness.tiny import make_tiny
from tests.helpers import GENERATION_STEPS, compute_once

VARIANTS = ("3.0", "3.1", "3.2")
SUITE = Path(harness.__file__).with_name("suite.py")


def pytest_configure(config):
    """One torch thread in this process, as the plugin gives each xdist worker: the tiny checkpoints' tensors gain
    nothing from more, and on a busy machine threads waiting on each other made a scratch trace 2.6 s instead of 0.14 s
    (measured on the 2-core development machine under load)."""
    torch.set_num_threads(1)
    # pyproject.toml registers it here; registered again for a run that loads this file from elsewhere (an editable
    # install's suite collected in another project), so that marking the suite slow warns of nothing there
    config.addinivalue_line("markers", "slow: runs the reference with its float64 oracle, or a pytest subprocess")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The layer x head suite (harness/suite.py, which `llama3_suite = true` adds to this repository's `pytest`) runs
    verify, the reference with its float64 oracle: slow, like the tests that do. Before `-m` deselects."""
    for item in items:
        if item.path == SUITE:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(variant="3.0", fmt="meta", seed=0)` -> directory of a tiny checkpoint, made once and reused."""
    made: dict[tuple, Path] = {}

    def get(variant: str = "3.0", fmt: str = "meta", seed: int = 0) -> Path:
        key = (variant, fmt, seed)
        if key not in made:
            out = tmp_path_factory.mktemp(f"tiny-{variant}-{fmt}-{seed}") / "ckpt"
            make_tiny(out, seed=seed, variant=variant, fmt=fmt)
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def traced_pair(tiny_checkpoint, tmp_path_factory, worker_id):
    """`traced_pair(variant, dtype, prompt=..., oracle=True, fmt="meta", seed=0)` -> (reference.h5, scratch.h5): the
    Hugging Face reference (with its float64 oracle unless `oracle=False`) and the from-scratch forward on a tiny
    checkpoint, traced once per session for every xdist worker (tests/helpers.py `compute_once`)."""
    made: dict[tuple, tuple[Path, Path]] = {}

    def get(variant="3.0", dtype="float32", *, prompt=DEFAULT_PROMPT, oracle=True, fmt="meta", seed=0):
        args = (variant, dtype, prompt, oracle, fmt, seed)
        if args not in made:

            def compute(folder: Path) -> list[str]:
                ckpt = open_checkpoint(tiny_checkpoint(variant, fmt, seed))
                trace_reference(ckpt, folder / "reference.h5", prompt=prompt, dtype=dtype, oracle=oracle)
                trace_scratch(ckpt, folder / "scratch.h5", prompt=prompt, dtype=dtype)
                return [str(folder / "reference.h5"), str(folder / "scratch.h5")]

            key = f"pair-{variant}-{fmt}-{seed}-{dtype}-{hashlib.sha1(repr(args).encode()).hexdigest()[:10]}"
            ref, impl = compute_once(tmp_path_factory, worker_id, key, compute)
            made[args] = Path(ref), Path(impl)
        return made[args]

    return get


@pytest.fixture(scope="session")
def generation_references(tiny_checkpoint, tmp_path_factory, worker_id):
    """{dtype: (run, reference trace)}: the reference's generation on tiny 3.0 (a prefill and GENERATION_STEPS greedy
    decode steps, with its float64 oracle) in float32 and bfloat16, traced once per session."""
    ckpt = open_checkpoint(tiny_checkpoint("3.0"))
    runs = {dtype: make_run(ckpt, dtype=dtype, generate=GENERATION_STEPS) for dtype in ("float32", "bfloat16")}

    def compute(folder: Path) -> dict[str, str]:
        for dtype, run in runs.items():
            trace_generation(run, builtin("reference"), folder / f"reference-{dtype}.h5")
        return {dtype: str(folder / f"reference-{dtype}.h5") for dtype in runs}

    paths = compute_once(tmp_path_factory, worker_id, "generation-references", compute)
    return {dtype: (run, Path(paths[dtype])) for dtype, run in runs.items()}
