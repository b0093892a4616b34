"""Compare two traces name by name under bf16-aware tolerances and find the first divergence in forward order.

A is the reference side, B the implementation judged. With a float64 oracle in A (names "_oracle.*") each name's
bound is calibrated on the reference's own rounding; without one, B is held to A under a fixed dtype-based bound.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import names as canon
from .errors import HarnessError
from .files import atomic_path
from .names import ORACLE_PREFIX
from .tracing import Trace, load_trace

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
#   B passes NAME when RMS(B - oracle) <= FLOOR_FACTOR * tail * (F_eff + ABS_TERM_ULPS * u * RMS(oracle)),
#   with u the unit roundoff of the less precise dtype, n the values the reference rounded, and
#   tail = 1 + TAIL_Z sqrt(1/(2 n) + 1/(2 n_f)) the small-sample allowance for B's error and for the floor's own
#   estimate (n_f = n, plus POOL_WEIGHT for a pooled floor). `bound` reports that as a relative L2 error;
#   `floor_ratio` = ratio * FLOOR_FACTOR (B's error over the tail-scaled floor) is what the heat maps show.
# Why: with 1-3 tokens many per-head tensors hold 1 to 6 values, so their own floor is one draw of the reference's
# rounding (measured: 10 of 16 runs on prompts of 1-3 tokens failed on correct code, up to 4.83x the bound at a
# 1-value `scores` whose own floor was 10x below its layer's heads'); and an implementation's own error on a few
# values is one draw too, so it needs room the chi distribution's tail gives.
#   Long prompts: the same rule again per block of positions (BLOCK_POSITIONS), each block's floor its own pooled
#   toward the name's; a name passes when it and every block pass, and reports the first position where it fails.
# Direct mode (no oracle): truth = A; B passes when ||B - A|| <= rtol * ||A|| + atol * sqrt(numel) (and so per block).
# Every name reports ratio = error / bound, the largest of the whole name's and its blocks': passes when ratio <= 1.
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

# Small samples: the ratio of an implementation's error RMS over n values to the floor, itself measured on n_f values
# of the reference's rounding, lies above its expectation by chance by up to about 1 + z sqrt(1/(2 n) + 1/(2 n_f))
# (two chi distributions' spread; z = 3.9: a 1-in-10^4 chance per name). n_f: the name's own rounded values, plus
# POOL_WEIGHT when its floor is pooled with a group's. Not fitted: from the distributions. Measured: a 1-value scores
# of a correct 1-token bfloat16 run reached 3.6x its layer's pooled floor (3.2, seed 0), which the factor (3.8 for one
# value) absorbs; a 2-token bfloat16 run reached 0.528 of the bound at a per-layer name of 192 values when only the
# implementation's side was counted (the five-seed sweep of 2026-11-24), 0.49 with the floor's own spread counted.
TAIL_Z = 3.9
# A head's `output` counts at most its causal probs as samples (`independent_samples`): its row i is sum_j p_ij v_j, so
# a probs error moves the whole row. Measured: on a 3-token bfloat16 prompt a correct run's head output erred 4.45%,
# inheriting its probs' 4.16% (6 causal values), and reached 0.559 of a bound that counted its 48 values; 0.38 with 6.

# Error along the sequence: a name with a position axis is also judged per block of positions, each block against
# its own floor (pooled toward the name's as a group of POOL_WEIGHT values), and passes only when every block does.
# A bug that grows with position (RoPE scaling, angles in low precision) is diluted in a whole-tensor error: the RoPE
# factor 32-for-8 bug at ~4000 tokens was 2.9x the whole-tensor bound at q_rotated, while its error in the last
# positions is several times its average. Blocks of BLOCK_POSITIONS positions, at least MIN_BLOCK_ROWS stored rows
# each (a long prompt's sampled scores/probs rows): prompts up to 2 x BLOCK_POSITIONS - 1 tokens are one block, so the
# rule measured on 1-256 tokens above is unchanged there.
BLOCK_POSITIONS = 256
MIN_BLOCK_ROWS = 8

# Streaming: a name is read CHUNK_ELEMENTS values (a whole number of rows) at a time on each side; compare holds no
# whole large tensor, and its memory does not grow with the prompt beyond one chunk (2 MiB per side in float64) and a
# few sums per block. Measured (tiny 3.1, bfloat16, `compare` peak RSS, 2026-11-24): 2^20 values a chunk and per-row
# sums kept: 521 MiB at 2048 tokens, 647 MiB at 8192; 2^18 and per-block sums: 385 and 421 MiB (the Python process
# with torch and h5py alone takes about 230 MiB).
CHUNK_ELEMENTS = 1 << 18

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
    first_failing_position: int | None = None  # the first position whose error leaves the bound (failing names)
    blocks: list[dict[str, Any]] | None = None  # per block of positions (long prompts): positions, rel_l2, floor, ratio


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
            "constants": {
                "floor_factor": FLOOR_FACTOR,
                "abs_term_ulps": ABS_TERM_ULPS,
                "pool_weight": POOL_WEIGHT,
                "tail_z": TAIL_Z,
                "block_positions": BLOCK_POSITIONS,
            },
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


def _logits_rows(a: torch.Tensor, b: torch.Tensor) -> tuple[list[bool], list[float], list[float]]:
    """(top-1 agrees, top-5 overlap, KL) of each row of A and B [R, V]: a chunk of rows at a time."""
    k = min(5, a.shape[-1])
    top1 = (a.argmax(-1) == b.argmax(-1)).tolist()
    top_a, top_b = a.topk(k, -1).indices, b.topk(k, -1).indices  # [R, k]
    top5 = [len(set(x) & set(y)) / k for x, y in zip(top_a.tolist(), top_b.tolist())]
    log_p, log_q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).tolist()  # [R]
    return top1, top5, kl


def _logits_summary(top1: list[bool], top5: list[float], kl: list[float], next_a: int, next_b: int) -> dict[str, Any]:
    return {
        "top1": top1,
        "top5": top5,
        "kl": kl,
        "top1_rate": sum(top1) / len(top1),
        "top5_rate": sum(top5) / len(top5),
        "kl_mean": sum(kl) / len(kl),
        "kl_max": max(kl),
        "next_token_a": next_a,
        "next_token_b": next_b,
    }


# ---- the rule ---------------------------------------------------------------------------------------------------------


def _less_precise(*dtypes: str) -> str:
    known = [d for d in dtypes if d in UNIT_ROUNDOFF]
    return max(known, key=UNIT_ROUNDOFF.__getitem__) if known else "float32"


def oracle_bound(floor: float, dtype: str, n: int) -> float:
    """The bound on rel_l2 of a name judged alone (its own group) whose reference rounded `n` values, with `floor`
    its reference's rel_l2: what `compare_tensors` computes without pooling."""
    return FLOOR_FACTOR * small_sample_factor(n, n) * (floor + ABS_TERM_ULPS * UNIT_ROUNDOFF[dtype])


def _direct_bound(truth2: float, n: int, dtype: str, rtol: float | None, atol: float | None) -> float:
    rtol = DIRECT_RTOL[dtype] if rtol is None else rtol
    atol = DIRECT_ATOL[dtype] if atol is None else atol
    norm, absolute = math.sqrt(truth2), atol * math.sqrt(n)
    return rtol + (absolute / norm if norm > 0 else (math.inf if absolute > 0 else 0.0))


@dataclass(frozen=True)
class Floor:
    """The reference's own rounding, per element: RMS of (reference - oracle) and RMS of the oracle, over `n` values."""

    error_rms: float
    truth_rms: float
    n: int
    n_rounded: int = 0  # values the reference did not get exactly (the samples of its rounding error)


def pooled(floors: list[Floor]) -> Floor:
    """One floor over several names (a layer's heads): RMS over all their values together."""
    n = sum(f.n for f in floors)
    if n == 0:
        return Floor(0.0, 0.0, 0)
    rms = lambda xs: math.sqrt(sum(f.n * x**2 for f, x in zip(floors, xs)) / n)  # noqa: E731
    return Floor(
        rms([f.error_rms for f in floors]), rms([f.truth_rms for f in floors]), n, sum(f.n_rounded for f in floors)
    )


def effective_floor(own: Floor, group: Floor) -> float:
    """The floor a name is held to, per element: its own, shrunk toward its group's when it has few values.

    (own.n * own^2 + POOL_WEIGHT * group^2) / (own.n + POOL_WEIGHT), never below its own: a 1-element `scores`
    of a 1-token prompt is judged by its layer's heads together, a 1024 x 1024 one by itself.
    """
    if own.n == 0:
        return group.error_rms
    shrunk = math.sqrt((own.n * own.error_rms**2 + POOL_WEIGHT * group.error_rms**2) / (own.n + POOL_WEIGHT))
    return max(own.error_rms, shrunk)


def small_sample_factor(n: int, n_floor: int | None = None) -> float:
    """How far above its expectation an error RMS over `n` samples may lie by chance, relative to a floor measured on
    `n_floor` samples (None: a known floor): 1 + TAIL_Z sqrt(1/(2 n) + 1/(2 n_floor)) (chi distributions' spread)."""
    spread = 1 / (2 * max(n, 1)) + (0.0 if n_floor is None else 1 / (2 * max(n_floor, 1)))
    return 1.0 + TAIL_Z * math.sqrt(spread)


def _causal_keep(n_keys: int, query_positions: torch.Tensor) -> torch.Tensor:
    """[R, K]: True where key j is at or before row r's query position: the part of `scores` judged.

    Real implementations record scores after the causal mask (-inf or the dtype's minimum above the diagonal), the
    harness's before it: zeroing above the diagonal on every side makes both recordings agree. A wrong mask still
    changes `probs`, which is judged whole. A long prompt's sampled rows sit at their own positions; a generation
    step's [T, K] scores are aligned bottom-right (its queries are the last T keys)."""
    return torch.arange(n_keys)[None, :] <= query_positions[:, None]


# ---- one name, streamed a chunk of rows at a time ---------------------------------------------------------------------


@dataclass
class Sums:
    """Sums over some values of one name (all of it, or a block of positions): every error, floor and bound comes
    from these."""

    n: int = 0  # finite values (on A, B and the truth)
    n_rounded: int = 0  # of them, where the reference differs from the truth (the samples of its rounding)
    ref_err2: float = 0.0  # sum of (A - truth)^2
    err2: float = 0.0  # sum of (B - truth)^2
    truth2: float = 0.0  # sum of truth^2

    @classmethod
    def of_rows(cls, rows: torch.Tensor) -> Sums:
        """From per-row sums [R, 5] (n, n_rounded, ref_err2, err2, truth2), added up."""
        n, n_rounded, ref_err2, err2, truth2 = rows.sum(0).tolist()
        return cls(int(n), int(n_rounded), ref_err2, err2, truth2)

    def floor(self) -> Floor:
        if self.n == 0:
            return Floor(0.0, 0.0, 0)
        return Floor(math.sqrt(self.ref_err2 / self.n), math.sqrt(self.truth2 / self.n), self.n, self.n_rounded)

    def relative(self, sum_of_squares: float) -> float:
        if self.truth2 == 0.0:
            return 0.0 if sum_of_squares == 0.0 else math.inf
        return math.sqrt(sum_of_squares / self.truth2)


Reader = Callable[[int, int], torch.Tensor]  # rows [start, stop) of a tensor, as stored


@dataclass
class NameStats:
    """Everything the verdict on one name needs, accumulated a chunk of rows at a time: the sums of each block of
    positions (the whole name's are their total), the largest errors, non-finite values, logits agreement. Nothing
    grows with the prompt but the logits' per-position agreement; `reread(lo, hi)` gives per-row sums again, for the
    first failing position of a failing block."""

    name: str
    shape: tuple[int, ...]
    positions: list[int] | None  # absolute position of each stored row; None: the name has no position axis
    blocks: list[tuple[int, int]]  # stored-row ranges [start, stop) judged apart (one: the whole name)
    has_oracle: bool
    block_sums: torch.Tensor | None = None  # [n_blocks, 5]: each block's sums (see Sums.of_rows)
    reread: Callable[[int, int], torch.Tensor] | None = None  # stored rows [lo, hi) -> their per-row sums [hi - lo, 5]
    b2: float = 0.0
    bt: float = 0.0
    max_abs: float = 0.0
    worst: tuple[float, int] | None = None  # (largest |B - truth|, flat index), non-finite as inf
    max_rel: float = 0.0
    truth_nonzero: bool = False
    b_equals_truth: bool = True
    n_bad: int = 0  # values non-finite on A or B
    first_bad: str | None = None
    bad_sides_equal: bool = True
    bad_a: bool = False
    bad_b: bool = False
    logits: tuple[list, list, list] | None = None
    next_tokens: tuple[int, int] | None = None

    def add_chunk(self, row0: int, a: torch.Tensor, b: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """Rows row0.. of the judged part of A, B and the truth (float64, same shape); returns their per-row sums."""
        bad_a, bad_b = ~torch.isfinite(a), ~torch.isfinite(b)
        if bool(bad_a.any() | bad_b.any()):
            bad = bad_a | bad_b
            if self.first_bad is None:
                where = tuple(bad.nonzero()[0].tolist())
                index = (where[0] + row0, *where[1:]) if where else where
                self.first_bad = f"first at index {index}: A={float(a[where])}, B={float(b[where])}"
            self.n_bad += int(bad.sum())
            self.bad_sides_equal &= bool((bad_a == bad_b).all())
            self.bad_a |= bool(bad_a.any())
            self.bad_b |= bool(bad_b.any())
        finite, ref_err, err, t = _errors(a, b, truth)
        n_rows = a.shape[0] if a.dim() else 1
        row_sums = _row_sums(finite, ref_err, err, t)  # [R, 5]
        b_f = torch.where(finite, b, torch.zeros((), dtype=b.dtype))
        self.b2 += float(b_f.pow(2).sum())
        self.bt += float((b_f * t).sum())
        abs_err = err.abs()
        if bool(finite.any()):
            self.max_abs = max(self.max_abs, float(abs_err.max()))
        nonzero = finite & (truth != 0)
        if bool(nonzero.any()):
            self.truth_nonzero = True
            self.max_rel = max(self.max_rel, float((abs_err[nonzero] / truth[nonzero].abs()).max()))
        self.b_equals_truth &= bool((err == 0).all())
        ranked = torch.where(finite, abs_err, torch.full_like(abs_err, math.inf)) if not bool(finite.all()) else abs_err
        if ranked.numel():
            top = int(ranked.flatten().argmax())
            value = float(ranked.flatten()[top])
            if value > 0 and (self.worst is None or value > self.worst[0]):
                self.worst = (value, top + row0 * (ranked.numel() // n_rows))
        return row_sums

    def add_logits(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Top-1/top-5/KL of rows of A and B (the reference side's logits, not the oracle's), chunk by chunk."""
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])  # [R, V]
        top1, top5, kl = _logits_rows(a, b)
        if self.logits is None:
            self.logits = ([], [], [])
        for kept, new in zip(self.logits, (top1, top5, kl)):
            kept += new
        self.next_tokens = (int(a[-1].argmax()), int(b[-1].argmax()))


def _errors(a: torch.Tensor, b: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(finite, A - truth, B - truth, truth), each zero where A, B or the truth is not finite."""
    finite = torch.isfinite(a) & torch.isfinite(b) & torch.isfinite(truth)
    zero = torch.zeros((), dtype=a.dtype)
    return (
        finite,
        torch.where(finite, a - truth, zero),
        torch.where(finite, b - truth, zero),
        torch.where(finite, truth, zero),
    )


def _row_sums(finite: torch.Tensor, ref_err: torch.Tensor, err: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """[R, 5] per stored row: finite values, rounded ones, sum (A - truth)^2, sum (B - truth)^2, sum truth^2."""
    n_rows = finite.shape[0] if finite.dim() else 1
    parts = (finite.double(), (ref_err != 0).double(), ref_err.pow(2), err.pow(2), truth.pow(2))
    return torch.stack([x.reshape(n_rows, -1).sum(-1) for x in parts], -1)


def name_positions(name: str, shape: tuple[int, ...], rows: list[int] | None, start: int = 0) -> list[int] | None:
    """The absolute position of each stored row of `name` (a generation step's rows start at `start`, the cache's
    at 0), or None when its first axis is not positions."""
    axes = canon.axes(name)
    if not shape or not axes or axes[0] not in ("T", "K") or len(axes) != len(shape):
        return None
    if axes[0] == "K":
        return list(range(shape[0]))
    return [start + r for r in (rows if rows is not None else range(shape[0]))]


def position_blocks(positions: list[int] | None, n_rows: int) -> list[tuple[int, int]]:
    """Stored-row ranges judged apart: BLOCK_POSITIONS positions each, at least MIN_BLOCK_ROWS rows, split evenly."""
    if positions is None or n_rows < 2:
        return [(0, max(n_rows, 1))]
    span = positions[-1] - positions[0] + 1
    n_blocks = max(1, min(span // BLOCK_POSITIONS, n_rows // MIN_BLOCK_ROWS))
    bounds = [round(i * n_rows / n_blocks) for i in range(n_blocks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def accumulate(
    name: str,
    read_a: Reader,
    read_b: Reader,
    read_truth: Reader | None,
    shape: tuple[int, ...],
    *,
    rows: list[int] | None = None,
    start: int = 0,
) -> NameStats:
    """Stream one name: chunks of rows of A, B and the truth (the oracle, or A itself), judged part only."""
    positions = name_positions(name, shape, rows, start)
    n_rows = shape[0] if shape else 1
    stats = NameStats(name, shape, positions, position_blocks(positions, n_rows), read_truth is not None)
    block_of = torch.zeros(n_rows, dtype=torch.long)  # [R]: each stored row's block
    for index, (lo, hi) in enumerate(stats.blocks):
        block_of[lo:hi] = index
    is_scores = canon.parse(name)[2] == "scores" and len(shape) == 2
    is_logits = canon.parse(name)[2] == "logits" and len(shape) >= 1
    full_rows = (rows[-1] + 1) if rows is not None else n_rows  # a [T, T] tensor's T, when rows are sampled
    step = max(1, CHUNK_ELEMENTS // (max(1, math.prod(shape[1:])) if shape else 1))

    def judged(r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b = read_a(r0, r1).double(), read_b(r0, r1).double()
        truth = read_truth(r0, r1).double() if read_truth is not None else a
        if is_scores:
            query = torch.tensor(rows[r0:r1]) if rows is not None else torch.arange(r0, r1) + (shape[1] - full_rows)
            keep = _causal_keep(shape[1], query)  # [R, K]
            return a.masked_fill(~keep, 0.0), b.masked_fill(~keep, 0.0), truth.masked_fill(~keep, 0.0)
        return a, b, truth

    def reread(lo: int, hi: int) -> torch.Tensor:
        sums = []
        for r0 in range(lo, hi, step):
            sums.append(_row_sums(*_errors(*judged(r0, min(hi, r0 + step)))))
        return torch.cat(sums)  # [hi - lo, 5]

    stats.block_sums = torch.zeros(len(stats.blocks), 5, dtype=torch.float64)
    stats.reread = reread
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        a, b, truth = judged(r0, r1)  # logits are never masked: A and B as stored
        if is_logits:
            stats.add_logits(a, b)
        row_sums = stats.add_chunk(r0, a, b, truth)  # [R, 5]
        stats.block_sums.index_add_(0, block_of[r0:r1], row_sums)
    return stats


def _reader(tensor: torch.Tensor) -> Reader:
    return (lambda r0, r1: tensor[r0:r1]) if tensor.dim() else (lambda r0, r1: tensor)


# ---- the verdict on one name --------------------------------------------------------------------------------------------


def _oracle_allowance(
    own: Floor, group: Floor, dtype: str, pooled_with: bool, samples: int | None = None
) -> tuple[float, float]:
    """(largest ||B - oracle|| allowed, floor per element) under the oracle rule, `own` pooled with `group`; `samples`:
    how many independent errors the name's values carry, when fewer than its rounded values (`independent_samples`)."""
    floor = effective_floor(own, group)
    per_element = floor + ABS_TERM_ULPS * UNIT_ROUNDOFF[dtype] * max(own.truth_rms, group.truth_rms)
    n = own.n_rounded if samples is None else min(own.n_rounded, samples)
    tail = small_sample_factor(n, n + (POOL_WEIGHT if pooled_with else 0))
    return FLOOR_FACTOR * tail * per_element * math.sqrt(own.n), floor


def independent_samples(name: str, positions: list[int] | None) -> int | None:
    """A head's `output` inherits its errors from its probs: row i is sum_j p_ij v_j, so an error in the i + 1 causal
    probs of the row moves all head_dim values together. Its independent samples are at most its rows' causal probs,
    sum (position + 1), not rows x head_dim (a 3-token prompt: 6, not 48). None for every other name."""
    _, head, part = canon.parse(name)
    if head is None or part != "output" or positions is None:
        return None
    return sum(p + 1 for p in positions)


def judge(
    stats: NameStats,
    *,
    dtype_a: str,
    dtype_b: str,
    group: Floor | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> NameResult:
    """The verdict on one streamed name: against the oracle (its floor pooled with `group`) or A's fixed bound; then
    every block of positions alike. Passes when the whole name and each block do."""
    name = stats.name
    whole = Sums.of_rows(stats.block_sums)
    dtype = _less_precise(dtype_a, dtype_b)
    distance, norm = math.sqrt(whole.err2), math.sqrt(whole.truth2)
    floor = effective = None
    if stats.has_oracle:
        own = whole.floor()
        samples = independent_samples(name, stats.positions)
        allowed, per_element = _oracle_allowance(own, group or own, dtype, group is not None, samples)
        floor = whole.relative(whole.ref_err2)
        effective = per_element * math.sqrt(own.n) / norm if norm > 0 else None
        name_floor = dataclasses.replace(own, error_rms=per_element)

        def allowance(s: Sums, lo: int, hi: int) -> float:
            return _oracle_allowance(
                s.floor(), name_floor, dtype, True, independent_samples(name, stats.positions[lo:hi])
            )[0]
    else:
        allowed = _direct_bound(whole.truth2, whole.n, dtype, rtol, atol) * norm

        def allowance(s: Sums, lo: int, hi: int) -> float:
            return _direct_bound(s.truth2, s.n, dtype, rtol, atol) * math.sqrt(s.truth2)

    ratio_of = lambda d, limit: d / limit if limit > 0 else (0.0 if d == 0 else math.inf)  # noqa: E731
    ratio = ratio_of(distance, allowed)
    bound = allowed / norm if norm > 0 else math.inf
    passed = distance <= allowed
    blocks, first_failing = None, None
    if len(stats.blocks) > 1:
        blocks = []
        for (lo, hi), sums in zip(stats.blocks, stats.block_sums):
            s = Sums.of_rows(sums[None])
            limit = allowance(s, lo, hi)
            block_ratio = ratio_of(math.sqrt(s.err2), limit)
            if block_ratio > 1 and first_failing is None:
                first_failing = _first_row_over(stats, lo, hi, limit / math.sqrt(max(s.n, 1)))
            blocks.append(
                {
                    "positions": [stats.positions[lo], stats.positions[hi - 1]],
                    "rel_l2": s.relative(s.err2),
                    "floor": s.relative(s.ref_err2) if stats.has_oracle else None,
                    "ratio": block_ratio,
                }
            )
        ratio = max([ratio] + [blk["ratio"] for blk in blocks])
        passed = passed and all(blk["ratio"] <= 1 for blk in blocks)
    nonfinite = None
    if stats.n_bad:
        sides = (
            "on both sides"
            if stats.bad_sides_equal
            else "in A only"
            if not stats.bad_b
            else "in B only"
            if not stats.bad_a
            else "on one side or both"
        )
        nonfinite = f"{stats.n_bad} of {math.prod(stats.shape)} values non-finite {sides} ({stats.first_bad})"
        passed, ratio = False, math.inf
    worst = None
    if stats.worst is not None and stats.positions is not None:
        worst = stats.positions[stats.worst[1] // max(1, math.prod(stats.shape[1:]))]
    if not passed and first_failing is None:
        first_failing = worst
    layer, head, _ = canon.parse(name)
    cos = (
        1.0
        if (stats.b2 == 0 or whole.truth2 == 0) and stats.b2 == whole.truth2
        else (0.0 if stats.b2 == 0 or whole.truth2 == 0 else stats.bt / math.sqrt(stats.b2 * whole.truth2))
    )
    max_relative = stats.max_rel if stats.truth_nonzero else (0.0 if stats.b_equals_truth else math.inf)
    logits = None
    if stats.logits is not None and nonfinite is None:
        logits = _logits_summary(*stats.logits, *stats.next_tokens)
    return NameResult(
        name=name,
        passed=passed,
        max_abs=stats.max_abs,
        max_rel=max_relative,
        rel_l2=whole.relative(whole.err2),
        cosine=cos,
        ratio=ratio,
        bound=bound,
        against="oracle" if stats.has_oracle else "A",
        floor=floor,
        floor_ratio=ratio * FLOOR_FACTOR if stats.has_oracle else None,
        dtype_a=dtype_a,
        dtype_b=dtype_b,
        layer=layer,
        head=head,
        worst_position=worst,
        nonfinite=nonfinite,
        logits=logits,
        pooled_floor=effective,
        first_failing_position=first_failing if not passed else None,
        blocks=blocks,
    )


def _first_row_over(stats: NameStats, lo: int, hi: int, per_element: float) -> int:
    """The position of the first stored row in [lo, hi) whose error RMS exceeds `per_element` (else the block's first):
    the block's rows read again (a failing name's, once)."""
    row_sums = stats.reread(lo, hi)  # [hi - lo, 5]
    n, err2 = row_sums[:, 0], row_sums[:, 3]  # [R]
    over = ((err2 / n.clamp_min(1)).sqrt() > per_element) & (n > 0)
    return stats.positions[lo + int(over.nonzero()[0])] if bool(over.any()) else stats.positions[lo]


def compare_tensors(
    name: str,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    oracle: torch.Tensor | None = None,
    dtype_a: str = "float32",
    dtype_b: str = "float32",
    rtol: float | None = None,
    atol: float | None = None,
    group: Floor | None = None,
    rows: list[int] | None = None,
    start: int = 0,
) -> NameResult:
    """One name in memory: B against the oracle (when given, with A's floor, pooled with `group`'s) or against A.

    `group`: the pooled floor of the name's group (its layer's heads for a per-head name); by default the name alone.
    `rows`: the positions of the stored rows, when the traces keep sampled rows of a long prompt's [T, T] tensor;
    `start`: the position of the first row (a generation step's).
    """
    stats = accumulate(
        name,
        _reader(a),
        _reader(b),
        _reader(oracle) if oracle is not None else None,
        tuple(a.shape),
        rows=rows,
        start=start,
    )
    return judge(stats, dtype_a=dtype_a, dtype_b=dtype_b, group=group, rtol=rtol, atol=atol)


# ---- two traces -------------------------------------------------------------------------------------------------------


def _check_comparable(a: Trace, b: Trace, common: list[str]) -> None:
    """Raise HarnessError (exit 2) when the traces are not runs of the same model on the same tokens."""
    ca, cb = a.attrs.get("checkpoint"), b.attrs.get("checkpoint")
    if ca is not None and cb is not None and ca != cb:
        raise HarnessError(f"traces come from different checkpoints: {a.path} has {ca!r}, {b.path} has {cb!r}")
    if "tokens" in a and "tokens" in b and a.tokens != b.tokens:
        ta, tb = a.tokens, b.tokens
        at = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        raise HarnessError(
            f"traces ran different tokens: {a.path} has {len(ta)}, {b.path} has {len(tb)}, first difference at position {at}"
        )
    if not common:
        raise HarnessError(f"nothing to compare: {a.path} and {b.path} have no tensor names in common besides 'tokens'")
    for name in common:
        if a.shape(name) != b.shape(name):
            raise HarnessError(
                f"{name!r} has shape {list(a.shape(name))} in {a.path} and {list(b.shape(name))} in {b.path}"
            )
        if a.rows(name) != b.rows(name):
            raise HarnessError(
                f"{name!r}: {a.path} and {b.path} keep different rows of it (traces of other harness versions?)"
            )


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


def _step_starts(trace: Trace, names: list[str]) -> dict[int, int]:
    """The position of each generation step's first token: step 0 (the prefill) at 0, decode step s at P + s - 1."""
    steps = {s for s in (canon.split_step(n)[0] for n in names) if s is not None}
    if not steps:
        return {}
    n_tokens = len(trace.tokens) if "tokens" in trace else None
    generate = trace.attrs.get("generate")
    n_decoded = int(generate) if isinstance(generate, int) else max(steps)
    prompt = n_tokens - n_decoded if n_tokens is not None else None
    return {s: 0 if s == 0 or prompt is None else prompt + s - 1 for s in steps}


def _heads_sibling(name: str, part: str) -> str:
    """The same head's `part` in the same step: 'steps.2.layers.0.attention.heads.3.probs', 'v' -> '...heads.3.v'."""
    step, base = canon.split_step(name)
    layer, head, _ = canon.parse(base)
    sibling = canon.head_name(layer, head, part)
    return sibling if step is None else canon.step_name(step, sibling)


def group_floors(ref: Trace, stats: dict[str, NameStats]) -> dict[str, Floor]:
    """The floor each per-head name is pooled with: its layer's heads' pooled floor, and for `probs` and `output` at
    least the floor its head's `scores` (and `v`, or in a decode step the cache's values) imply (`propagated_floor`,
    streamed over the oracle's probs). Names without an oracle get none."""
    heads = [n for n, s in stats.items() if _group_of(n) != n and s.has_oracle]
    own = {name: Sums.of_rows(stats[name].block_sums).floor() for name in heads}
    members: dict[str, list[Floor]] = {}
    for name in heads:
        members.setdefault(_group_of(name), []).append(own[name])
    pools = {group: pooled(floors) for group, floors in members.items()}
    out = {name: pools[_group_of(name)] for name in heads}
    for name in heads:
        part = canon.parse(name)[2]
        probs, scores = _heads_sibling(name, "probs"), _heads_sibling(name, "scores")
        if part not in ("probs", "output") or scores not in own or ORACLE_PREFIX + probs not in ref:
            continue
        keys = ref.shape(probs)[-1]
        values = next(
            (
                n
                for n in (_heads_sibling(name, "v"), _heads_sibling(name, "cache_v"))
                if n in own and ref.shape(n)[0] == keys
            ),
            None,
        )
        if values is None:
            continue
        floor_s = effective_floor(own[scores], pools[_group_of(scores)])
        floor_v = effective_floor(own[values], pools[_group_of(values)])
        v = ref[ORACLE_PREFIX + values].double()  # [K, hd]
        model = _streamed_propagation(part, ref, ORACLE_PREFIX + probs, v, floor_s, floor_v)
        out[name] = dataclasses.replace(out[name], error_rms=max(out[name].error_rms, model))
    return out


def _streamed_propagation(
    part: str, ref: Trace, probs_name: str, v: torch.Tensor, floor_s: float, floor_v: float
) -> float:
    n_rows, n_keys = ref.shape(probs_name)
    step = max(1, CHUNK_ELEMENTS // max(1, n_keys))
    total, count = 0.0, 0
    for r0 in range(0, n_rows, step):
        s, c = _propagation_sums(
            part, ref.read_rows(probs_name, r0, min(n_rows, r0 + step)).double(), v, floor_s, floor_v
        )
        total, count = total + s, count + c
    return math.sqrt(total / count) if count else 0.0


def propagated_floor(part: str, probs: torch.Tensor, v: torch.Tensor, floor_scores: float, floor_v: float) -> float:
    """RMS error of `probs` or of the head's `output` that independent errors of RMS `floor_scores` on the scores
    (and `floor_v` on v) would cause: a rounding model on the oracle's values, for heads too small to show their own.

    Softmax: dp_ij = p_ij (ds_ij - sum_k p_ik ds_ik), so E dp_ij^2 = fs^2 p_ij^2 (1 - 2 p_ij + sum_k p_ik^2).
    Output o_i = sum_j p_ij v_j: do_i = sum_j p_ij ds_ij (v_j - o_i) + sum_j p_ij dv_j, so
    E |do_i|^2 = fs^2 sum_j p_ij^2 |v_j - o_i|^2 + fv^2 hd sum_j p_ij^2.
    """
    total, count = _propagation_sums(part, probs, v, floor_scores, floor_v)
    return math.sqrt(total / count) if count else 0.0


def _propagation_sums(part: str, probs: torch.Tensor, v: torch.Tensor, fs: float, fv: float) -> tuple[float, int]:
    """(sum of the expected squared errors, how many values) over rows of probs [R, K] (v [K, hd])."""
    p2 = probs.pow(2)  # [R, K]
    if part == "probs":
        expected = p2 * (1 - 2 * probs + p2.sum(-1, keepdim=True))  # [R, K]
        return fs**2 * float(expected.clamp_min(0).sum()), probs.numel()
    out = probs @ v  # [R, hd]
    # sum_j p_ij^2 |v_j - o_i|^2, expanded: no [R, K, hd] temporary at long prompts
    spread = p2 @ v.pow(2).sum(-1) - 2 * ((p2 @ v) * out).sum(-1) + p2.sum(-1) * out.pow(2).sum(-1)  # [R]
    per_row = fs**2 * spread.clamp_min(0) + fv**2 * v.shape[-1] * p2.sum(-1)  # [R]
    return float(per_row.sum()), out.numel()


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread while comparing: chunks are small, and on a busy machine a second thread made the same
    comparison 6x slower (tiny 3.1, 4096 tokens, layer 0: 8.4 s on one thread, 52.5 s on two, 2 loaded cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def compare_traces(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    token_text: Callable[[int], str] | None = None,
) -> Comparison:
    """Compare every name present in both traces; A is the reference side.

    Calibrated against A's oracle when it has one (B's, when only B has one: then B is the reference side and the
    Comparison names it as A); `rtol`/`atol` force the fixed direct bound instead. `token_text(id)` turns the worst
    positions into text. Each name is streamed a chunk of rows at a time (`accumulate`), then judged (`judge`).
    """
    with load_trace(path_a) as a, load_trace(path_b) as b, _one_thread():
        common = [n for n in a.names if n in b and n != "tokens"]
        _check_comparable(a, b, common)
        ref, impl, swapped = _oracle_side(a, b)
        use_oracle = rtol is None and atol is None
        has_oracle = any(n.startswith(ORACLE_PREFIX) for n in ref.extra_names)
        da, db = a.attrs.get("dtype"), b.attrs.get("dtype")
        if not (use_oracle and has_oracle) and da and db and da != db:
            raise HarnessError(
                f"traces ran in different dtypes ({a.path}: {da}, {b.path}: {db}); without a float64 oracle "
                f"there is no common bound: compare runs of one dtype, or a reference trace with its oracle"
            )
        oracles = set(ref.extra_names) if use_oracle else set()
        starts = _step_starts(ref, common)
        stats = {}
        read = lambda trace, n: lambda r0, r1: trace.read_rows(n, r0, r1)  # noqa: E731
        for name in common:
            truth = ORACLE_PREFIX + name if ORACLE_PREFIX + name in oracles else None
            stats[name] = accumulate(
                name,
                read(ref, name),
                read(impl, name),
                read(ref, truth) if truth else None,
                ref.shape(name),
                rows=ref.rows(name),
                start=starts.get(canon.split_step(name)[0], 0),
            )
        groups = group_floors(ref, stats) if use_oracle else {}
        run_ref, run_impl = ref.attrs.get("dtype"), impl.attrs.get("dtype")
        results = [
            judge(
                stats[name],
                dtype_a=_dtype_of(ref, run_ref, name),
                dtype_b=_dtype_of(impl, run_impl, name),
                group=groups.get(name),
                rtol=rtol,
                atol=atol,
            )
            for name in common
        ]
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
        path_a=str(path_ref),
        path_b=str(path_impl),
        passed=not failed,
        first_divergence=failed[0].name if failed else None,
        first_nonfinite=nonfinite[0].name if nonfinite else None,
        results=results,
        only_in_a=only_ref,
        only_in_b=only_impl,
        mode="mixed" if len(against) > 1 else ("oracle" if against == {"oracle"} else "direct"),
        tokens=tokens,
        token_texts=token_texts,
        attrs_a=attrs_ref,
        attrs_b=attrs_impl,
        swapped=swapped,
    )


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
