"""Known hand-written-Llama bugs (tests/mutants.py FORWARD), applied to the from-scratch forward: each must fail, first
at the name where it sits.

And the unmutated forward must pass at 5 seeds and 3 sizes. The margin between the weakest bug and the worst correct
run, printed by `test_margin_between_bugs_and_correct_runs`, is the measurement that chose harness/compare.py's
FLOOR_FACTOR. Every run is traced once per session (tests/helpers.py `compute_once`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.checkpoint import open_checkpoint
from harness.compare import FLOOR_FACTOR, compare_traces
from harness.run import trace_reference, trace_scratch
from harness.tiny import make_tiny_meta
from tests.helpers import compute_once
from tests.mutants import FORWARD

pytestmark = pytest.mark.slow  # 16 traces of the reference with its float64 oracle

DTYPES = ("float32", "bfloat16")
PROMPT = "the answer to the ultimate question of life, the universe, and everything is "


# Correct runs: (label, variant, seed, params.json override): 5 seeds of tiny 3.0, a deeper multi-query model,
# and a wider multi-head one with head_dim 64.
CORRECT = [(f"3.0-seed{s}", "3.0", s, None) for s in range(5)] + [
    (
        "mqa-4layers",
        "3.0",
        0,
        dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=1, multiple_of=16, norm_eps=1e-5, rope_theta=500000.0),
    ),
    (
        "mha-hd64",
        "3.0",
        0,
        dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=4, multiple_of=64, norm_eps=1e-5, rope_theta=500000.0),
    ),
]


# ---- traced once per session -----------------------------------------------------------------------------------------


def _reference(ckpt, out: Path, dtype: str) -> Path:
    trace_reference(ckpt, out, prompt=PROMPT, dtype=dtype, oracle=True)
    return out


def _verdict(comparison) -> dict:
    first = comparison.result(comparison.first_divergence) if comparison.first_divergence else None
    worst = max(comparison.results, key=lambda r: r.ratio)
    return dict(
        passed=comparison.passed,
        first=comparison.first_divergence,
        nonfinite=comparison.first_nonfinite,
        first_ratio=first.ratio if first else None,
        first_floor_ratio=first.floor_ratio if first else None,
        worst=worst.name,
        worst_ratio=worst.ratio,
        worst_floor_ratio=worst.floor_ratio,
        mode=comparison.mode,
    )


@pytest.fixture(scope="session")
def mutant_runs(tiny_checkpoint, tmp_path_factory, worker_id):
    """{"<mutant>-<dtype>": verdict} for every FORWARD mutant on tiny 3.0."""

    def compute(work: Path) -> dict:
        ckpt = open_checkpoint(tiny_checkpoint("3.0"))
        out = {}
        for dtype in DTYPES:
            ref = _reference(ckpt, work / f"reference-{dtype}.h5", dtype)
            for m in FORWARD:
                path = work / f"{m.id}-{dtype}.h5"
                with pytest.MonkeyPatch.context() as mp:
                    m.apply(mp, ckpt.config)
                    trace_scratch(ckpt, path, prompt=PROMPT, dtype=dtype)
                out[f"{m.id}-{dtype}"] = _verdict(compare_traces(ref, path))
                path.unlink()
        return out

    return compute_once(tmp_path_factory, worker_id, "mutant-runs", compute)


@pytest.fixture(scope="session")
def correct_runs(tiny_checkpoint, tmp_path_factory, worker_id):
    """{"<label>-<dtype>": verdict} for every correct run of CORRECT."""

    def compute(work: Path) -> dict:
        out = {}
        for label, variant, seed, params in CORRECT:
            if params is None:
                ckpt = open_checkpoint(tiny_checkpoint(variant, seed=seed))
            else:
                make_tiny_meta(work / label, seed=seed, params=params)
                ckpt = open_checkpoint(work / label)
            for dtype in DTYPES:
                ref = _reference(ckpt, work / f"{label}-reference-{dtype}.h5", dtype)
                path = work / f"{label}-scratch-{dtype}.h5"
                trace_scratch(ckpt, path, prompt=PROMPT, dtype=dtype)
                out[f"{label}-{dtype}"] = _verdict(compare_traces(ref, path))
        return out

    return compute_once(tmp_path_factory, worker_id, "correct-runs", compute)


# ---- the specification -----------------------------------------------------------------------------------------------


@pytest.mark.xdist_group("mutant-runs")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mutant", FORWARD, ids=[m.id for m in FORWARD])
def test_mutant_fails_first_where_the_bug_sits(mutant_runs, mutant, dtype):
    v = mutant_runs[f"{mutant.id}-{dtype}"]
    assert v["mode"] == "oracle", f"expected a comparison calibrated on the reference's oracle, got {v['mode']}"
    assert not v["passed"], f"{mutant.bug} ({dtype}) passed: worst {v['worst']} at {v['worst_ratio']:.3g}x its bound"
    assert v["first"] == mutant.first, (
        f"{mutant.bug} ({dtype}): first divergence {v['first']} ({v['first_ratio']:.3g}x its bound), "
        f"expected {mutant.first}"
    )


@pytest.mark.xdist_group("correct-runs")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label", [c[0] for c in CORRECT])
def test_correct_forward_passes(correct_runs, label, dtype):
    v = correct_runs[f"{label}-{dtype}"]
    assert v["mode"] == "oracle", f"expected a comparison calibrated on the reference's oracle, got {v['mode']}"
    assert v["passed"], (
        f"false alarm on {label} {dtype}: first divergence {v['first']} at {v['first_ratio']:.3g}x its bound"
    )


@pytest.mark.xdist_group("correct-runs")
def test_margin_between_bugs_and_correct_runs(mutant_runs, correct_runs):
    """The weakest bug must sit well above the bound and the worst correct run well below: this chose FLOOR_FACTOR."""
    caught = {k: v for k, v in mutant_runs.items() if v["first"] is not None and v["nonfinite"] is None}
    weakest = min(caught, key=lambda k: caught[k]["first_floor_ratio"])
    worst = max(correct_runs, key=lambda k: correct_runs[k]["worst_floor_ratio"])
    low, high = caught[weakest]["first_floor_ratio"], correct_runs[worst]["worst_floor_ratio"]
    print(
        f"\nweakest bug: {weakest} at {low:.3g}x the floor ({caught[weakest]['first_ratio']:.3g}x its bound) "
        f"at {caught[weakest]['first']}"
    )
    print(
        f"worst correct run: {worst} at {high:.3g}x the floor ({correct_runs[worst]['worst_ratio']:.3g}x its bound) "
        f"at {correct_runs[worst]['worst']}"
    )
    print(
        f"FLOOR_FACTOR {FLOOR_FACTOR:g}: {FLOOR_FACTOR / high:.2f}x above the worst correct run, "
        f"{low / FLOOR_FACTOR:.2f}x below the weakest bug"
    )
    for dtype in DTYPES:
        lows = [v["first_floor_ratio"] for k, v in caught.items() if k.endswith(dtype)]
        highs = [v["worst_floor_ratio"] for k, v in correct_runs.items() if k.endswith(dtype)]
        print(f"  {dtype}: correct runs up to {max(highs):.3g}x the floor, bugs from {min(lows):.3g}x")
    assert high * 1.5 <= FLOOR_FACTOR <= low / 1.5, (
        f"FLOOR_FACTOR {FLOOR_FACTOR} must leave 1.5x on both sides: worst correct {high:.3g} ({worst}), "
        f"weakest bug {low:.3g} ({weakest})"
    )
