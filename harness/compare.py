"""Compare two traces name by name under bf16-aware tolerances and find the first divergence in forward order.

A is the reference side, B the implementation judged. With a float64 oracle in A (names "_oracle.*") each name's
bound is calibrated on the reference's own rounding; without one, B is held to A under a fixed dtype-based bound.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import names as canon
from .errors import HarnessError
from .tracing import Trace, atomic_path, load_trace

ORACLE_PREFIX = "_oracle."

# ---------------------------------------------------------------------------------------------------------------------
# The tolerance table: every constant of the rule, each with the measurement that chose it.
#
# Error of a name: relative L2 error against the truth, ||x - truth|| / ||truth||, over the whole tensor; `scores`
# over their causal part only (row i, keys 0..i: real implementations record them after the mask).
# Oracle mode: truth = the reference run in float64 (A's "_oracle.NAME"); per element, over the name's n values:
#   own floor  f = RMS(A - oracle), the reference's own rounding (the old rule's floor, as an RMS);
#   group floor g = RMS(A - oracle) over the same name of every head of the layer, for a per-head name; for `probs`
#               and a head's `output` at least what the head's scores (and v) floors imply through softmax and
#               probs @ v on the oracle's values (`propagated_floor`); a non-head name is its own group;
#   floor      F_eff = max(f, sqrt((n_f f^2 + POOL_WEIGHT g^2) / (n_f + POOL_WEIGHT))): a tensor of 1 to a few values
#               (1-3 token prompts) is held to its layer's heads together, a large one to its own floor;
#   B passes NAME when RMS(B - oracle) <= FLOOR_FACTOR * tail(n_f) * (F_eff + ABS_TERM_ULPS * u * RMS(oracle)),
#   with u the unit roundoff of the less precise dtype, n_f the values the reference rounded, and
#   tail(n) = 1 + TAIL_Z / sqrt(2 n) the small-sample allowance. `bound` reports that as a relative L2 error;
#   `floor_ratio` = ratio * FLOOR_FACTOR (B's error over the tail-scaled floor) is what the heat maps show.
# Why: with 1-3 tokens many per-head tensors hold 1 to 6 values, so their own floor is one draw of the reference's
# rounding (measured: 10 of 16 runs on prompts of 1-3 tokens failed on correct code, up to 4.83x the bound at a
# 1-value `scores` whose own floor was 10x below its layer's heads'); and an implementation's own error on a few
# values is one draw too, so it needs room the chi distribution's tail gives.
# Direct mode (no oracle): truth = A; B passes when ||B - A|| <= rtol * ||A|| + atol * sqrt(numel).
# Every name reports ratio = error / bound: a name passes when ratio <= 1.
# ---------------------------------------------------------------------------------------------------------------------

# Unit roundoff (half an ulp at 1) of each dtype a trace can be computed in.
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}

# How many times the (pooled, tail-scaled) floor an implementation may reach. Measured with the pooled rule on the
# tiny checkpoints against harness/reference.py (HF LlamaForCausalLM, eager attention): benchmarks/separation.py
# (prompts of 1-256 tokens, 3.0/3.1/3.2, float32/bfloat16/float16, per-head, vectorized and other-precision scratch
# variants; README table) has correct runs at most 0.44 of the bound (2.2x the floor: float16, 2 tokens, a head's
# output); tests/test_mutations.py (default prompt, 5 seeds, 3 sizes) at most 1.82x (bfloat16 probs) and 1.35x in
# float32. The 19 catalogued bugs sit from 12x the floor (GELU for SiLU, bfloat16) up, in float32 from 2e5x.
# 5 is 2.3x above the worst correct run and 2.4x below the weakest bug (the old rule had the same constant).
FLOOR_FACTOR = 5.0

# Pooling (statistics for small tensors): a per-head name's floor is shrunk toward its group's (its layer's heads,
# and for probs/output the floor its scores and v imply), the group weighing as POOL_WEIGHT values. 64: the group
# decides for a 1-3 token prompt's scores and probs (1-9 values, own weight <= 12%) and fades at the default 17-token
# prompt (289 values, own weight 82%) and beyond. Measured: with it no false alarm in the sweep (worst 0.44); with the
# own floor alone, the same quick sweep had 21 false alarms on 1-3 token prompts, up to 4.83x the bound.
POOL_WEIGHT = 64

# Small samples: an implementation's error over n values lies above its RMS by chance by up to about
# 1 + z / sqrt(2 n) (the chi distribution's upper tail; z = 3.9: a 1-in-10^4 chance per name for one value). Not
# fitted: from the distribution. Measured with it: a 1-value scores of a correct 1-token bfloat16 run reached 3.6x its
# layer's pooled floor (3.2, seed 0), which the factor (3.76 for one value) absorbs; at >= 10^4 values it is <= 1.03.
TAIL_Z = 3.9

# Absolute term, in units of u, added to the floor: a name the reference computes exactly (embeddings: a gather) has
# floor 0, while a correct implementation that rounds once more there has an error of about u/sqrt(3) (0.58 u, one
# uniform rounding). FLOOR_FACTOR * 0.25 u = 1 u covers that; at layer 0 floors are already ~0.6 u (bf16: 0.0023),
# so the term never dominates a bound where a bug could hide.
ABS_TERM_ULPS = 0.25

# Direct mode (no oracle), by the less precise dtype of the two sides: a relative L2 bound and an RMS absolute term.
# Coarse by design: the difference of two correct runs grows with depth and width. Measured, scratch vs HF on the
# tiny checkpoints (3 layers): bfloat16 up to 4.3% relative L2, float32 up to 1.2e-6, float64 ~1e-15; the issue's
# floors (1.8% after 8 layers) put two correct bf16 runs ~2.8% apart there. Hence bfloat16 0.1, float16 the same
# scaled by its 8x smaller unit roundoff, float32 1e-5, float64 1e-10. atol about one unit roundoff, as an RMS: keeps
# all-zero tensors and their tiny neighbours comparable. Golden files use their own tighter table (harness/golden.py).
DIRECT_RTOL = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 1e-1, "float16": 1.5e-2}
DIRECT_ATOL = {"float64": 1e-15, "float32": 1e-7, "bfloat16": 4e-3, "float16": 5e-4}
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class NameResult:
    """One name's verdict and metrics; every error is against the truth (the oracle, or A in direct mode)."""

    name: str
    passed: bool
    max_abs: float
    max_rel: float
    rel_l2: float
    cosine: float
    ratio: float  # rel_l2 / bound: passes when <= 1
    bound: float
    against: str  # "oracle" or "A"
    floor: float | None = None  # the reference's own rel_l2 against the oracle
    floor_ratio: float | None = None  # rel_l2 / (floor + absolute term): the calibration quantity
    dtype_a: str = ""
    dtype_b: str = ""
    layer: int | None = None
    head: int | None = None
    worst_position: int | None = None  # token index of the largest absolute error
    worst_token: str | None = None
    nonfinite: str | None = None  # set when NaN/Inf appear on one side and not the other
    logits: dict[str, Any] | None = None  # top-1/top-5 agreement and KL for `logits`
    pooled_floor: float | None = None  # the floor the name is held to (its own, or pooled with its layer's heads)


@dataclass
class Comparison:
    path_a: str
    path_b: str
    passed: bool
    first_divergence: str | None
    first_nonfinite: str | None
    results: list[NameResult]
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    mode: str = "oracle"  # "oracle", "direct" or "mixed"
    tokens: list[int] | None = None
    token_texts: list[str] | None = None
    attrs_a: dict[str, Any] = field(default_factory=dict)
    attrs_b: dict[str, Any] = field(default_factory=dict)
    swapped: bool = False  # only the second file given held the oracle: it is A (the reference side) here

    def result(self, name: str) -> NameResult | None:
        return next((r for r in self.results if r.name == name), None)

    @property
    def failed(self) -> list[NameResult]:
        return [r for r in self.results if not r.passed]

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "first_divergence": self.first_divergence,
            "first_nonfinite": self.first_nonfinite,
            "mode": self.mode,
            "a": self.path_a,
            "b": self.path_b,
            "swapped": self.swapped,
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "constants": {"floor_factor": FLOOR_FACTOR, "abs_term_ulps": ABS_TERM_ULPS, "pool_weight": POOL_WEIGHT, "tail_z": TAIL_Z},
            "results": [_finite_json(asdict(r)) for r in self.results],
        }


def _finite_json(d: dict[str, Any]) -> dict[str, Any]:
    """JSON has no inf/nan: write them as strings so the file stays standard JSON."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def write_json(comparison: Comparison, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(comparison.to_json(), indent=1) + "\n", encoding="utf-8")


# ---- metrics ----------------------------------------------------------------------------------------------------------


def rel_l2(x: torch.Tensor, truth: torch.Tensor) -> float:
    """||x - truth|| / ||truth|| (0 when both are zero, inf when only the truth is)."""
    diff = float(torch.linalg.vector_norm(x - truth))
    norm = float(torch.linalg.vector_norm(truth))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def cosine(x: torch.Tensor, truth: torch.Tensor) -> float:
    nx, nt = float(torch.linalg.vector_norm(x)), float(torch.linalg.vector_norm(truth))
    if nx == 0.0 or nt == 0.0:
        return 1.0 if nx == nt else 0.0
    return float((x.flatten() @ truth.flatten()) / (nx * nt))


def max_rel(x: torch.Tensor, truth: torch.Tensor) -> float:
    nonzero = truth != 0
    if not bool(nonzero.any()):
        return 0.0 if bool((x == truth).all()) else math.inf
    return float(((x - truth).abs()[nonzero] / truth.abs()[nonzero]).max())


def _nonfinite_mismatch(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Any NaN/Inf, on one side or on both: how many and where first; None when every value is finite.

    Non-finite values on both sides are no agreement: a correct Llama forward has none at any canonical name, so
    NaN weights or a float16 overflow are reported where they first appear, never compared as equal.
    """
    bad_a, bad_b = ~torch.isfinite(a), ~torch.isfinite(b)
    bad = bad_a | bad_b
    if not bool(bad.any()):
        return None
    where = tuple(bad.nonzero()[0].tolist())
    n = int(bad.sum())
    sides = "on both sides" if bool((bad_a == bad_b).all()) else ("in A only" if not bool(bad_b.any()) else "in B only" if not bool(bad_a.any()) else "on one side or both")
    return f"{n} of {a.numel()} values non-finite {sides} (first at index {where}: A={float(a[where])}, B={float(b[where])})"


def logits_metrics(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Per position: B's top-1 equals A's, overlap of the top-5 sets, KL(softmax(A) || softmax(B))."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])  # [T, V]
    k = min(5, a.shape[-1])
    top1 = (a.argmax(-1) == b.argmax(-1)).tolist()
    top_a, top_b = a.topk(k, -1).indices, b.topk(k, -1).indices  # [T, k]
    top5 = [len(set(x) & set(y)) / k for x, y in zip(top_a.tolist(), top_b.tolist())]
    log_p, log_q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).tolist()  # [T]
    return {
        "top1": top1,
        "top5": top5,
        "kl": kl,
        "top1_rate": sum(top1) / len(top1),
        "top5_rate": sum(top5) / len(top5),
        "kl_mean": sum(kl) / len(kl),
        "kl_max": max(kl),
        "next_token_a": int(a[-1].argmax()),
        "next_token_b": int(b[-1].argmax()),
    }


# ---- the rule ---------------------------------------------------------------------------------------------------------


def _less_precise(*dtypes: str) -> str:
    known = [d for d in dtypes if d in UNIT_ROUNDOFF]
    return max(known, key=UNIT_ROUNDOFF.__getitem__) if known else "float32"


def oracle_bound(floor: float, dtype: str, n: int) -> float:
    """The bound on rel_l2 of a name judged alone (its own group) whose reference rounded `n` values, with `floor`
    its reference's rel_l2: what `compare_tensors` computes without pooling."""
    return FLOOR_FACTOR * small_sample_factor(n) * (floor + ABS_TERM_ULPS * UNIT_ROUNDOFF[dtype])


def direct_bound(truth: torch.Tensor, dtype: str, rtol: float | None, atol: float | None) -> float:
    """`||B - A|| <= rtol ||A|| + atol sqrt(n)` as a bound on rel_l2 (inf-free: a zero A gives atol's share)."""
    rtol = DIRECT_RTOL[dtype] if rtol is None else rtol
    atol = DIRECT_ATOL[dtype] if atol is None else atol
    norm = float(torch.linalg.vector_norm(truth))
    absolute = atol * math.sqrt(truth.numel())
    return rtol + (absolute / norm if norm > 0 else (math.inf if absolute > 0 else 0.0))


@dataclass(frozen=True)
class Floor:
    """The reference's own rounding, per element: RMS of (reference - oracle) and RMS of the oracle, over `n` values."""

    error_rms: float
    truth_rms: float
    n: int
    n_rounded: int = 0  # values the reference did not get exactly (the samples of its rounding error)


def floor_of(reference: torch.Tensor, truth: torch.Tensor) -> Floor:
    """The floor statistics of one name (finite values only; tensors already restricted by `judged_part`)."""
    finite = torch.isfinite(reference) & torch.isfinite(truth)
    n = int(finite.sum())
    if n == 0:
        return Floor(0.0, 0.0, 0)
    diff, t = (reference - truth)[finite], truth[finite]
    return Floor(float(diff.pow(2).mean().sqrt()), float(t.pow(2).mean().sqrt()), n, int((diff != 0).sum()))


def pooled(floors: list[Floor]) -> Floor:
    """One floor over several names (a layer's heads): RMS over all their values together."""
    n = sum(f.n for f in floors)
    if n == 0:
        return Floor(0.0, 0.0, 0)
    rms = lambda xs: math.sqrt(sum(f.n * x**2 for f, x in zip(floors, xs)) / n)  # noqa: E731
    return Floor(rms([f.error_rms for f in floors]), rms([f.truth_rms for f in floors]), n, sum(f.n_rounded for f in floors))


def effective_floor(own: Floor, group: Floor) -> float:
    """The floor a name is held to, per element: its own, shrunk toward its group's when it has few values.

    (own.n * own^2 + POOL_WEIGHT * group^2) / (own.n + POOL_WEIGHT), never below its own: a 1-element `scores`
    of a 1-token prompt is judged by its layer's heads together, a 1024 x 1024 one by itself.
    """
    if own.n == 0:
        return group.error_rms
    shrunk = math.sqrt((own.n * own.error_rms**2 + POOL_WEIGHT * group.error_rms**2) / (own.n + POOL_WEIGHT))
    return max(own.error_rms, shrunk)


def small_sample_factor(n: int) -> float:
    """How far above its RMS the error of `n` samples may lie by chance: 1 + TAIL_Z / sqrt(2 n) (chi_n's upper tail)."""
    return 1.0 + TAIL_Z / math.sqrt(2 * max(n, 1))


def judged_part(name: str, *tensors: torch.Tensor, rows: list[int] | None = None) -> list[torch.Tensor]:
    """What a name is judged on: `scores` on its causal part (row i, keys 0..i), the rest whole.

    Real implementations record scores after the causal mask (-inf or the dtype's minimum above the diagonal), the
    harness's before it: zeroing above the diagonal on every side makes both recordings agree. A wrong mask still
    changes `probs`, which is judged whole. `rows`: the positions of the stored rows, when a long prompt's trace keeps
    sampled rows only.
    """
    if canon.parse(name)[2] != "scores" or tensors[0].dim() != 2:
        return list(tensors)
    n_rows, n_keys = tensors[0].shape
    positions = torch.tensor(rows) if rows is not None else torch.arange(n_rows)  # [R]: each row's query position
    if rows is None and n_rows != n_keys:
        return list(tensors)
    upper = torch.arange(n_keys)[None, :] > positions[:, None]  # [R, T]: True after the query's own position
    return [t.masked_fill(upper, 0.0) for t in tensors]


def compare_tensors(name: str, a: torch.Tensor, b: torch.Tensor, *, oracle: torch.Tensor | None = None,
                    dtype_a: str = "float32", dtype_b: str = "float32", rtol: float | None = None,
                    atol: float | None = None, group: Floor | None = None, rows: list[int] | None = None) -> NameResult:
    """One name: B against the oracle (when given, with A's floor, pooled with `group`'s) or against A.

    `group`: the pooled floor of the name's group (its layer's heads for a per-head name); by default the name alone.
    `rows`: the positions of the stored rows, when the traces keep sampled rows of a long prompt's [T, T] tensor.
    """
    a, b = a.double(), b.double()
    oracle = oracle.double() if oracle is not None else None
    a, b, *rest = judged_part(name, a, b, *([oracle] if oracle is not None else []), rows=rows)
    oracle = rest[0] if rest else None
    layer, head, _ = canon.parse(name)
    dtype = _less_precise(dtype_a, dtype_b)
    nonfinite = _nonfinite_mismatch(a, b)
    truth = oracle if oracle is not None else a
    finite = torch.isfinite(a) & torch.isfinite(b) & torch.isfinite(truth)
    a_f, b_f, t_f = a[finite], b[finite], truth[finite]
    error = rel_l2(b_f, t_f)
    floor = floor_ratio = effective = None
    if oracle is not None:
        own = floor_of(a_f, t_f)
        floor = rel_l2(a_f, t_f)
        allowed, effective = _oracle_allowance(own, group or own, dtype)  # on ||B - oracle||
        distance = float(torch.linalg.vector_norm(b_f - t_f))
        norm = float(torch.linalg.vector_norm(t_f))
        ratio = distance / allowed if allowed > 0 else (0.0 if distance == 0 else math.inf)
        bound = allowed / norm if norm > 0 else math.inf
        floor_ratio = ratio * FLOOR_FACTOR
        passed_bound = distance <= allowed
    else:
        bound = direct_bound(t_f, dtype, rtol, atol)
        ratio = error / bound if bound > 0 else (0.0 if error == 0 else math.inf)
        passed_bound = error <= bound
    passed = nonfinite is None and passed_bound
    if nonfinite is not None:
        ratio = math.inf
    abs_err = torch.where(finite, (b - truth).abs(), torch.zeros_like(b))
    abs_err = torch.where(finite, abs_err, torch.full_like(b, math.inf)) if nonfinite else abs_err
    worst = None
    axes = canon.axes(name)
    if abs_err.numel() and axes and axes[0] == "T" and abs_err.dim() == len(axes) and float(abs_err.max()) > 0:
        worst = int(torch.unravel_index(abs_err.argmax(), abs_err.shape)[0])
        worst = rows[worst] if rows is not None else worst
    return NameResult(
        name=name, passed=passed, max_abs=float(abs_err[finite].max()) if bool(finite.any()) else 0.0,
        max_rel=max_rel(b_f, t_f), rel_l2=error, cosine=cosine(b_f, t_f), ratio=ratio, bound=bound,
        against="oracle" if oracle is not None else "A", floor=floor, floor_ratio=floor_ratio, dtype_a=dtype_a,
        dtype_b=dtype_b, layer=layer, head=head, worst_position=worst, nonfinite=nonfinite,
        logits=logits_metrics(a, b) if name == "logits" and nonfinite is None and a.dim() >= 1 else None,
        pooled_floor=effective,
    )  # fmt: skip


def _oracle_allowance(own: Floor, group: Floor, dtype: str) -> tuple[float, float | None]:
    """(largest ||B - oracle|| allowed, effective floor as a relative L2) under the oracle rule."""
    per_element = effective_floor(own, group) + ABS_TERM_ULPS * UNIT_ROUNDOFF[dtype] * max(own.truth_rms, group.truth_rms)
    truth_norm = own.truth_rms * math.sqrt(own.n)
    effective = effective_floor(own, group) * math.sqrt(own.n) / truth_norm if truth_norm > 0 else None
    return FLOOR_FACTOR * small_sample_factor(own.n_rounded) * per_element * math.sqrt(own.n), effective


# ---- two traces -------------------------------------------------------------------------------------------------------


def _check_comparable(a: Trace, b: Trace, common: list[str]) -> None:
    """Raise HarnessError (exit 2) when the traces are not runs of the same model on the same tokens."""
    ca, cb = a.attrs.get("checkpoint"), b.attrs.get("checkpoint")
    if ca is not None and cb is not None and ca != cb:
        raise HarnessError(f"traces come from different checkpoints: {a.path} has {ca!r}, {b.path} has {cb!r}")
    if "tokens" in a and "tokens" in b and a.tokens != b.tokens:
        ta, tb = a.tokens, b.tokens
        at = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        raise HarnessError(f"traces ran different tokens: {a.path} has {len(ta)}, {b.path} has {len(tb)}, first difference at position {at}")
    if not common:
        raise HarnessError(f"nothing to compare: {a.path} and {b.path} have no tensor names in common besides 'tokens'")
    for name in common:
        if a.shape(name) != b.shape(name):
            raise HarnessError(f"{name!r} has shape {list(a.shape(name))} in {a.path} and {list(b.shape(name))} in {b.path}")
        if a.rows(name) != b.rows(name):
            raise HarnessError(f"{name!r}: {a.path} and {b.path} keep different rows of it (traces of other harness versions?)")


def _dtype_of(trace: Trace, run_dtype: object, name: str) -> str:
    """The run's working dtype (attr `dtype`), else the name's own: bf16 runs record some names in float32."""
    return run_dtype if run_dtype in UNIT_ROUNDOFF else trace.dtype(name)


def _oracle_side(a: Trace, b: Trace) -> tuple[Trace, Trace, bool]:
    """The side holding a float64 oracle is the reference side; B judged. Swapped when only B holds one."""
    if any(n.startswith(ORACLE_PREFIX) for n in a.extra_names):
        return a, b, False
    if any(n.startswith(ORACLE_PREFIX) for n in b.extra_names):
        return b, a, True
    return a, b, False


def _group_of(name: str) -> str:
    """Names whose floors are pooled: a per-head name with the same name of its layer's other heads, in the same
    generation step (a prefill's floors say nothing of a decode step's)."""
    step, base = canon.split_step(name)
    layer, head, part = canon.parse(base)
    if head is None:
        return name
    return ("" if step is None else f"steps.{step}.") + f"layers.{layer}.attention.heads.*.{part}"


def group_floors(ref: Trace, names: list[str]) -> dict[str, Floor]:
    """The floor each per-head name of `names` is pooled with: its layer's heads' pooled floor, and for `probs` and
    `output` at least the floor its head's `scores` (and `v`) floors imply (`propagated_floor`). Reads the reference
    and its oracle; names without an oracle get none."""
    heads = [n for n in names if _group_of(n) != n and ORACLE_PREFIX + n in ref]
    own = {}
    for name in heads:
        a, truth = judged_part(name, ref[name].double(), ref[ORACLE_PREFIX + name].double(), rows=ref.rows(name))
        own[name] = floor_of(a, truth)
    members: dict[str, list[Floor]] = {}
    for name in heads:
        members.setdefault(_group_of(name), []).append(own[name])
    pools = {group: pooled(floors) for group, floors in members.items()}
    out = {name: pools[_group_of(name)] for name in heads}
    for name in heads:
        layer, head, part = canon.parse(name)
        scores, v = canon.head_name(layer, head, "scores"), canon.head_name(layer, head, "v")
        if part in ("probs", "output") and scores in own and v in own:
            floor_s = effective_floor(own[scores], pools[_group_of(scores)])
            floor_v = effective_floor(own[v], pools[_group_of(v)])
            probs = ref[ORACLE_PREFIX + canon.head_name(layer, head, "probs")].double()
            model = propagated_floor(part, probs, ref[ORACLE_PREFIX + v].double(), floor_s, floor_v)
            out[name] = dataclasses.replace(out[name], error_rms=max(out[name].error_rms, model))
    return out


def propagated_floor(part: str, probs: torch.Tensor, v: torch.Tensor, floor_scores: float, floor_v: float) -> float:
    """RMS error of `probs` or of the head's `output` that independent errors of RMS `floor_scores` on the scores
    (and `floor_v` on v) would cause: a rounding model on the oracle's values, for heads too small to show their own.

    Softmax: dp_ij = p_ij (ds_ij - sum_k p_ik ds_ik), so E dp_ij^2 = fs^2 p_ij^2 (1 - 2 p_ij + sum_k p_ik^2).
    Output o_i = sum_j p_ij v_j: do_i = sum_j p_ij ds_ij (v_j - o_i) + sum_j p_ij dv_j, so
    E |do_i|^2 = fs^2 sum_j p_ij^2 |v_j - o_i|^2 + fv^2 hd sum_j p_ij^2.
    """
    p2 = probs.pow(2)  # [T, T]
    if part == "probs":
        expected = p2 * (1 - 2 * probs + p2.sum(-1, keepdim=True))  # [T, T]
        return floor_scores * float(expected.clamp_min(0).mean().sqrt())
    out = probs @ v  # [T, hd]
    spread = (v[None, :, :] - out[:, None, :]).pow(2).sum(-1)  # [T, T]: |v_j - o_i|^2
    per_row = floor_scores**2 * (p2 * spread).sum(-1) + floor_v**2 * v.shape[-1] * p2.sum(-1)  # [T]
    return math.sqrt(float(per_row.sum()) / out.numel())


def compare_traces(path_a: str | os.PathLike, path_b: str | os.PathLike, *, rtol: float | None = None,
                   atol: float | None = None, token_text: Callable[[int], str] | None = None) -> Comparison:
    """Compare every name present in both traces; A is the reference side.

    Calibrated against A's oracle when it has one (B's, when only B has one: then B is the reference side and the
    Comparison names it as A); `rtol`/`atol` force the fixed direct bound instead. `token_text(id)` turns the worst
    positions into text.
    """
    with load_trace(path_a) as a, load_trace(path_b) as b:
        common = [n for n in a.names if n in b and n != "tokens"]
        _check_comparable(a, b, common)
        ref, impl, swapped = _oracle_side(a, b)
        use_oracle = rtol is None and atol is None
        has_oracle = any(n.startswith(ORACLE_PREFIX) for n in ref.extra_names)
        da, db = a.attrs.get("dtype"), b.attrs.get("dtype")
        if not (use_oracle and has_oracle) and da and db and da != db:
            raise HarnessError(f"traces ran in different dtypes ({a.path}: {da}, {b.path}: {db}); without a float64 oracle "
                               f"there is no common bound: compare runs of one dtype, or a reference trace with its oracle")  # fmt: skip
        oracles = set(ref.extra_names) if use_oracle else set()
        groups = group_floors(ref, common) if use_oracle else {}
        run_ref, run_impl = ref.attrs.get("dtype"), impl.attrs.get("dtype")
        results = []
        for name in common:
            oracle = ref[ORACLE_PREFIX + name] if ORACLE_PREFIX + name in oracles else None
            results.append(compare_tensors(name, ref[name], impl[name], oracle=oracle, dtype_a=_dtype_of(ref, run_ref, name),
                                           dtype_b=_dtype_of(impl, run_impl, name), rtol=rtol, atol=atol,
                                           group=groups.get(name), rows=ref.rows(name)))  # fmt: skip
        tokens = a.tokens if "tokens" in a else (b.tokens if "tokens" in b else None)
        if tokens is None and isinstance(a.attrs.get("tokens"), list):
            tokens = [int(t) for t in a.attrs["tokens"]]
        only_ref = [n for n in ref.names if n not in impl and n != "tokens"]
        only_impl = [n for n in impl.names if n not in ref and n != "tokens"]
        attrs_ref, attrs_impl = ref.attrs, impl.attrs
    token_texts = None
    if tokens is not None and token_text is not None:
        token_texts = [token_text(t) for t in tokens]
        for r in results:
            if r.worst_position is not None and r.worst_position < len(token_texts):
                r.worst_token = token_texts[r.worst_position]
    against = {r.against for r in results}
    failed = [r for r in results if not r.passed]
    nonfinite = [r for r in results if r.nonfinite]
    path_ref, path_impl = (path_b, path_a) if swapped else (path_a, path_b)
    return Comparison(
        path_a=str(path_ref), path_b=str(path_impl), passed=not failed, first_divergence=failed[0].name if failed else None,
        first_nonfinite=nonfinite[0].name if nonfinite else None, results=results, only_in_a=only_ref,
        only_in_b=only_impl, mode="mixed" if len(against) > 1 else ("oracle" if against == {"oracle"} else "direct"),
        tokens=tokens, token_texts=token_texts, attrs_a=attrs_ref, attrs_b=attrs_impl, swapped=swapped,
    )  # fmt: skip


def tokenizer_for(attrs: dict[str, Any]) -> Callable[[int], str] | None:
    """Token text from the checkpoint a trace names (attr `checkpoint_path`), when it is still there; else None."""
    path = attrs.get("checkpoint_path")
    if not isinstance(path, str) or not Path(path).is_dir():
        return None
    from .checkpoint import open_checkpoint
    from .tokenizer import load_tokenizer, token_text_of

    try:
        ckpt = open_checkpoint(path)
        return token_text_of(load_tokenizer(ckpt.tokenizer_path)) if ckpt.tokenizer_path else None
    except HarnessError:
        return None


__all__ = ["Comparison", "NameResult", "compare_tensors", "compare_traces", "write_json"]
