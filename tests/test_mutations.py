"""Known hand-written-Llama bugs, applied to the from-scratch forward: each must fail, first at the name where it sits.

And the unmutated forward must pass at 5 seeds and 3 sizes. The margin between the weakest bug and the worst correct
run, printed by `test_margin_between_bugs_and_correct_runs`, is the measurement that chose harness/compare.py's
FLOOR_FACTOR. Every run is traced once per session (shared by the xdist workers under a file lock).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from harness import scratch
from harness.checkpoint import open_checkpoint
from harness.compare import FLOOR_FACTOR, compare_traces
from harness.files import atomic_path
from harness.runner import trace_scratch
from harness.tiny import make_tiny_meta
from harness.tracing import record

DTYPES = ("float32", "bfloat16")
PROMPT = "the answer to the ultimate question of life, the universe, and everything is "


# ---- the catalogue: each entry wraps one small function of harness/scratch.py ---------------------------------------


@dataclass(frozen=True)
class Mutant:
    id: str
    bug: str
    first: str  # the name where the bug sits, on the tiny 3.0 checkpoint (8 heads, 2 KV heads)
    target: str  # the function of harness/scratch.py replaced
    make: Callable  # make(original, config) -> replacement


def _layer_with(*, attention_residual_from_norm: bool = False, ffn_residual: bool = True):
    """scratch.transformer_layer with one line changed (the rest as in harness/scratch.py)."""

    def make(original, config):
        def layer(layer, x, weights, config, freqs_cis, mask):
            x_norm = scratch.rms_norm(x, weights["attention_norm"], config.norm_eps)
            record(f"layers.{layer}.attention_norm", x_norm)
            attention_output = scratch.attention(layer, x_norm, weights, config, freqs_cis, mask)
            record(f"layers.{layer}.attention.output", attention_output)
            attention_residual = (x_norm if attention_residual_from_norm else x) + attention_output  # bug: x_norm
            record(f"layers.{layer}.attention_residual", attention_residual)
            h_norm = scratch.rms_norm(attention_residual, weights["ffn_norm"], config.norm_eps)
            record(f"layers.{layer}.ffn_norm", h_norm)
            ffn = scratch.feed_forward(layer, h_norm, weights)
            output = attention_residual + ffn if ffn_residual else ffn  # bug: residual dropped
            record(f"layers.{layer}.output", output)
            return output

        return layer

    return make


def _weights_with(change: Callable[[dict], None]):
    def make(original, config):
        def layer_weights(ckpt, layer, dtype, device):
            w = original(ckpt, layer, dtype, device)
            change(w)
            return w

        return layer_weights

    return make


def _rotate_halves(original, config):
    """HF's rotate_half pairing (i, i + hd/2) applied to Meta's interleaved q/k rows, without the permutation."""

    def rotate(x, freqs_cis):
        half = x.shape[-1] // 2
        interleaved = torch.stack([x[..., :half], x[..., half:]], -1).flatten(-2)  # [T, hd]: pairs (i, i + hd/2)
        out = original(interleaved, freqs_cis).unflatten(-1, (half, 2))  # [T, hd/2, 2]
        return torch.cat([out[..., 0], out[..., 1]], -1)  # [T, hd]

    return rotate


def _skip_final_norm(original, config):
    calls = itertools.count()

    def rms_norm(x, weight, eps):  # 2 calls per layer, then the final norm
        return x if next(calls) == 2 * config.n_layers else original(x, weight, eps)

    return rms_norm


def _swap(w: dict, a: str, b: str) -> None:
    w[a], w[b] = w[b], w[a]


HEAD0 = "layers.0.attention.heads.0"
CATALOGUE = [
    Mutant(
        "rope_theta",
        "rope_theta 10000 (Llama 2's) instead of the checkpoint's 500000",
        f"{HEAD0}.q_rotated",
        "rope_freqs_cis",
        lambda f, c: lambda cfg, n, dt, dev: f(dataclasses.replace(cfg, rope_theta=10000.0), n, dt, dev),
    ),
    Mutant(
        "positions_from_1",
        "RoPE positions start at 1",
        f"{HEAD0}.q_rotated",
        "rope_freqs_cis",
        lambda f, c: lambda cfg, n, dt, dev: f(cfg, n + 1, dt, dev)[1:],
    ),
    Mutant(
        "rotate_half",
        "rotate_half pairing on Meta's interleaved layout",
        f"{HEAD0}.q_rotated",
        "rotate",
        _rotate_halves,
    ),
    Mutant(
        "gqa_modulo",
        "GQA: query head h reads KV head h % n_kv instead of h // n_rep",
        "layers.0.attention.heads.1.k",
        "kv_head_of",
        lambda f, c: lambda h, cfg: h % cfg.n_kv_heads,
    ),
    Mutant(
        "scale_sqrt_dim",
        "scores divided by sqrt(dim) instead of sqrt(head_dim)",
        f"{HEAD0}.scores",
        "score_scale",
        lambda f, c: lambda cfg: cfg.dim**0.5,
    ),
    Mutant(
        "mask_diagonal_0",
        "causal mask triu(diagonal=0): a token cannot see itself",
        f"{HEAD0}.probs",
        "causal_mask",
        lambda f, c: lambda n, dt, dev: torch.triu(torch.full((n, n), float("-inf"), dtype=dt, device=dev), 0),
    ),
    Mutant(
        "no_mask",
        "no causal mask",
        f"{HEAD0}.probs",
        "causal_mask",
        lambda f, c: lambda n, dt, dev: torch.zeros(n, n, dtype=dt, device=dev),
    ),
    Mutant(
        "softmax_dim0",
        "softmax over queries (dim 0) instead of keys",
        f"{HEAD0}.probs",
        "softmax",
        lambda f, c: lambda s: torch.nn.functional.softmax(s, dim=0),
    ),
    Mutant(
        "norm_weight_dropped",
        "RMSNorm without its weight",
        "layers.0.attention_norm",
        "rms_norm",
        lambda f, c: lambda x, w, eps: f(x, torch.ones_like(w), eps),
    ),
    Mutant(
        "norm_over_tokens",
        "RMSNorm mean over tokens (dim 0) instead of features",
        "layers.0.attention_norm",
        "rms_norm",
        lambda f, c: lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + eps) * w,
    ),
    Mutant(
        "residual_from_norm",
        "attention residual added to the normed input",
        "layers.0.attention_residual",
        "transformer_layer",
        _layer_with(attention_residual_from_norm=True),
    ),
    Mutant(
        "ffn_residual_dropped",
        "no residual around the feed-forward",
        "layers.0.output",
        "transformer_layer",
        _layer_with(ffn_residual=False),
    ),
    Mutant(
        "wo_transposed",
        "output projection applied as wo instead of wo.T",
        "layers.0.attention.output",
        "layer_weights",
        _weights_with(lambda w: w.update({"attention.wo": w["attention.wo"].T})),
    ),
    Mutant(
        "wo_skipped",
        "output projection not applied (heads concatenated only)",
        "layers.0.attention.output",
        "layer_weights",
        _weights_with(
            lambda w: w.update({"attention.wo": torch.eye(w["attention.wo"].shape[0], dtype=w["attention.wo"].dtype)})
        ),
    ),
    Mutant(
        "silu_on_up",
        "SwiGLU: silu applied to up (w3) instead of gate (w1)",
        "layers.0.feed_forward.hidden",
        "swiglu",
        lambda f, c: lambda gate, up: gate * torch.nn.functional.silu(up),
    ),
    Mutant(
        "gelu",
        "GELU instead of SiLU in the gate",
        "layers.0.feed_forward.hidden",
        "swiglu",
        lambda f, c: lambda gate, up: torch.nn.functional.gelu(gate) * up,
    ),
    Mutant(
        "w1_w3_swapped",
        "w1 and w3 swapped",
        "layers.0.feed_forward.gate",
        "layer_weights",
        _weights_with(lambda w: _swap(w, "feed_forward.w1", "feed_forward.w3")),
    ),
    Mutant(
        "previous_layer_weights",
        "layer l reads layer l-1's weights (off by one)",
        "layers.1.attention_norm",
        "layer_weights",
        lambda f, c: lambda ckpt, layer, dt, dev: f(ckpt, max(layer - 1, 0), dt, dev),
    ),
    Mutant(
        "final_norm_skipped", "final RMSNorm skipped before the output projection", "norm", "rms_norm", _skip_final_norm
    ),
]

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


def XDIST_GROUP(item) -> str:
    """The conftest's xdist grouping: the mutant tests share one computation, the correct runs another."""
    return "mutants" if "mutant" in item.name else "correct-runs"


# ---- traced once per session ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory, worker_id) -> Path:
    """A folder all xdist workers of this session share (the session's base temp, not a worker's own)."""
    base = tmp_path_factory.getbasetemp()
    out = (base if worker_id == "master" else base.parent) / "mutation-runs"
    out.mkdir(exist_ok=True)
    return out


def _once(folder: Path, key: str, compute: Callable[[Path], dict]) -> dict:
    """compute(workdir) -> JSON-able dict, run by the first worker to get here; the others read its result."""
    from filelock import FileLock

    path = folder / f"{key}.json"
    with FileLock(str(folder / f".{key}.lock")):
        if not path.exists():
            work = folder / key
            work.mkdir(exist_ok=True)
            result = compute(work)
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(result))
    return json.loads(path.read_text())


def _reference(ckpt, out: Path, dtype: str) -> Path:
    from harness.runner import trace_reference

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
def mutant_runs(tiny_checkpoint, runs_dir):
    def compute(work: Path) -> dict:
        ckpt = open_checkpoint(tiny_checkpoint("3.0"))
        out = {}
        for dtype in DTYPES:
            ref = _reference(ckpt, work / f"reference-{dtype}.h5", dtype)
            for m in CATALOGUE:
                path = work / f"{m.id}-{dtype}.h5"
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(scratch, m.target, m.make(getattr(scratch, m.target), ckpt.config))
                    trace_scratch(ckpt, path, prompt=PROMPT, dtype=dtype)
                out[f"{m.id}-{dtype}"] = _verdict(compare_traces(ref, path))
                path.unlink()
        return out

    return _once(runs_dir, "mutants", compute)


@pytest.fixture(scope="session")
def correct_runs(tiny_checkpoint, runs_dir):
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

    return _once(runs_dir, "correct", compute)


# ---- the specification ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mutant", CATALOGUE, ids=[m.id for m in CATALOGUE])
def test_mutant_fails_first_where_the_bug_sits(mutant_runs, mutant, dtype):
    v = mutant_runs[f"{mutant.id}-{dtype}"]
    assert v["mode"] == "oracle", f"expected a comparison calibrated on the reference's oracle, got {v['mode']}"
    assert not v["passed"], f"{mutant.bug} ({dtype}) passed: worst {v['worst']} at {v['worst_ratio']:.3g}x its bound"
    assert v["first"] == mutant.first, (
        f"{mutant.bug} ({dtype}): first divergence {v['first']} ({v['first_ratio']:.3g}x its bound), expected {mutant.first}"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label", [c[0] for c in CORRECT])
def test_correct_forward_passes(correct_runs, label, dtype):
    v = correct_runs[f"{label}-{dtype}"]
    assert v["mode"] == "oracle", f"expected a comparison calibrated on the reference's oracle, got {v['mode']}"
    assert v["passed"], (
        f"false alarm on {label} {dtype}: first divergence {v['first']} at {v['first_ratio']:.3g}x its bound"
    )


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
        f"FLOOR_FACTOR {FLOOR_FACTOR:g}: {FLOOR_FACTOR / high:.2f}x above the worst correct run, {low / FLOOR_FACTOR:.2f}x below the weakest bug"
    )
    for dtype in DTYPES:
        lows = [v["first_floor_ratio"] for k, v in caught.items() if k.endswith(dtype)]
        highs = [v["worst_floor_ratio"] for k, v in correct_runs.items() if k.endswith(dtype)]
        print(f"  {dtype}: correct runs up to {max(highs):.3g}x the floor, bugs from {min(lows):.3g}x")
    assert high * 1.5 <= FLOOR_FACTOR <= low / 1.5, (
        f"FLOOR_FACTOR {FLOOR_FACTOR} must leave 1.5x on both sides: worst correct {high:.3g} ({worst}), weakest bug {low:.3g} ({weakest})"
    )
