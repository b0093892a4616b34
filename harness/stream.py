"""Read two traces (and the oracle) a chunk of rows at a time: the sums each verdict needs, and its display metrics.

The rule that turns the sums into a verdict is harness/bound.py; compare.py judges each name from a `NameStats`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import names as canon
from .bound import (
    BLOCK_POSITIONS,
    MIN_BLOCK_ROWS,
    Floor,
    Sums,
    effective_floor,
    pooled,
    propagation_sums,
)
from .names import ORACLE_PREFIX
from .trace_file import Trace

# Streaming: a name is read CHUNK_ELEMENTS values (a whole number of rows) at a time on each side; compare holds no
# whole large tensor, and its memory does not grow with the prompt beyond one chunk (2 MiB per side in float64) and a
# few sums per block. Measured (tiny 3.1, bfloat16, `compare` peak RSS, 2026-11-24): 2^20 values a chunk and per-row
# sums kept: 521 MiB at 2048 tokens, 647 MiB at 8192; 2^18 and per-block sums (as here): 385 and 421 MiB (the Python
# process with torch and h5py alone takes about 230 MiB). docs/calibration.md, CHUNK_ELEMENTS.
CHUNK_ELEMENTS = 1 << 18

Reader = Callable[[int, int], torch.Tensor]  # rows [start, stop) of a tensor, as stored


# ---- the verdict's sums ----------------------------------------------------------------------------------------------


@dataclass
class RowSums:
    """Sums per stored row (or per block of rows) of one name: a [R, 5] float64 table, one column per field of
    `Sums`, read by name."""

    FIELDS = ("n", "n_rounded", "ref_err2", "err2", "truth2")
    table: torch.Tensor  # [R, 5]

    @classmethod
    def zeros(cls, n_rows: int) -> RowSums:
        return cls(torch.zeros(n_rows, len(cls.FIELDS), dtype=torch.float64))

    @classmethod
    def of(cls, finite: torch.Tensor, ref_err: torch.Tensor, err: torch.Tensor, truth: torch.Tensor) -> RowSums:
        """Per stored row of (finite, A - truth, B - truth, truth) [R, ...]: the values of each field, summed."""
        n_rows = finite.shape[0] if finite.dim() else 1
        parts = (finite.double(), (ref_err != 0).double(), ref_err.pow(2), err.pow(2), truth.pow(2))
        return cls(torch.stack([x.reshape(n_rows, -1).sum(-1) for x in parts], -1))

    @property
    def n(self) -> torch.Tensor:  # [R]
        return self.table[:, self.FIELDS.index("n")]

    @property
    def err2(self) -> torch.Tensor:  # [R]
        return self.table[:, self.FIELDS.index("err2")]

    def total(self) -> Sums:
        """All rows added up."""
        n, n_rounded, ref_err2, err2, truth2 = self.table.sum(0).tolist()
        return Sums(int(n), int(n_rounded), ref_err2, err2, truth2)

    def row(self, index: int) -> Sums:
        return RowSums(self.table[index : index + 1]).total()

    def add_at(self, index: torch.Tensor, rows: RowSums) -> None:
        """Add each of `rows` into the row `index` [R] names (a chunk's rows into their blocks)."""
        self.table.index_add_(0, index, rows.table)


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


# ---- what is shown beside the verdict --------------------------------------------------------------------------------


@dataclass
class Metrics:
    """The display metrics of one name: cosine, largest absolute and relative errors and where the largest is."""

    b2: float = 0.0  # sum of B^2 (finite values)
    bt: float = 0.0  # sum of B * truth
    max_abs: float = 0.0
    worst: tuple[float, int] | None = None  # (largest |B - truth|, flat index), non-finite as inf
    max_rel: float = 0.0
    truth_nonzero: bool = False
    b_equals_truth: bool = True

    def add(self, row0: int, b: torch.Tensor, finite: torch.Tensor, err: torch.Tensor, t: torch.Tensor) -> None:
        """Rows row0.. of B, with `finite`, `err` = B - truth and `t` = the truth, both zero where not finite."""
        n_rows = b.shape[0] if b.dim() else 1
        b_f = torch.where(finite, b, torch.zeros((), dtype=b.dtype))
        self.b2 += float(b_f.pow(2).sum())
        self.bt += float((b_f * t).sum())
        abs_err = err.abs()
        if bool(finite.any()):
            self.max_abs = max(self.max_abs, float(abs_err.max()))
        nonzero = finite & (t != 0)
        if bool(nonzero.any()):
            self.truth_nonzero = True
            self.max_rel = max(self.max_rel, float((abs_err[nonzero] / t[nonzero].abs()).max()))
        self.b_equals_truth &= bool((err == 0).all())
        ranked = torch.where(finite, abs_err, torch.full_like(abs_err, math.inf)) if not bool(finite.all()) else abs_err
        if ranked.numel():
            top = int(ranked.flatten().argmax())
            value = float(ranked.flatten()[top])
            if value > 0 and (self.worst is None or value > self.worst[0]):
                self.worst = (value, top + row0 * (ranked.numel() // n_rows))

    def cosine(self, truth2: float) -> float:
        """cos(B, truth) over the finite values, `truth2` their sum of truth^2 (1 when both are zero)."""
        if self.b2 == 0 or truth2 == 0:
            return 1.0 if self.b2 == truth2 else 0.0
        return self.bt / math.sqrt(self.b2 * truth2)

    def max_relative(self) -> float:
        return self.max_rel if self.truth_nonzero else (0.0 if self.b_equals_truth else math.inf)


@dataclass
class NonFinite:
    """NaN and Inf on either side: how many, which side, and the first one."""

    count: int = 0  # values non-finite on A or B
    first: str | None = None
    sides_equal: bool = True
    in_a: bool = False
    in_b: bool = False

    def add(self, row0: int, a: torch.Tensor, b: torch.Tensor) -> None:
        bad_a, bad_b = ~torch.isfinite(a), ~torch.isfinite(b)
        if not bool(bad_a.any() | bad_b.any()):
            return
        bad = bad_a | bad_b
        if self.first is None:
            where = tuple(bad.nonzero()[0].tolist())
            index = (where[0] + row0, *where[1:]) if where else where
            self.first = f"first at index {index}: A={float(a[where])}, B={float(b[where])}"
        self.count += int(bad.sum())
        self.sides_equal &= bool((bad_a == bad_b).all())
        self.in_a |= bool(bad_a.any())
        self.in_b |= bool(bad_b.any())

    def describe(self, numel: int) -> str | None:
        """'K of N values non-finite SIDES (first at ...)', or None when every value is finite."""
        if not self.count:
            return None
        if self.sides_equal:
            sides = "on both sides"
        elif not self.in_b:
            sides = "in A only"
        elif not self.in_a:
            sides = "in B only"
        else:
            sides = "on one side or both"
        return f"{self.count} of {numel} values non-finite {sides} ({self.first})"


def logits_rows(a: torch.Tensor, b: torch.Tensor) -> tuple[list[bool], list[float], list[float]]:
    """(top-1 agrees, top-5 overlap, KL) of each row of A and B [R, V]: a chunk of rows at a time."""
    k = min(5, a.shape[-1])
    top1 = (a.argmax(-1) == b.argmax(-1)).tolist()
    top_a, top_b = a.topk(k, -1).indices, b.topk(k, -1).indices  # [R, k]
    top5 = [len(set(x) & set(y)) / k for x, y in zip(top_a.tolist(), top_b.tolist())]
    log_p, log_q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).tolist()  # [R]
    return top1, top5, kl


@dataclass
class Logits:
    """Top-1/top-5 agreement and KL per position of `logits` (the reference side's, not the oracle's)."""

    top1: list[bool] = field(default_factory=list)
    top5: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    next_tokens: tuple[int, int] = (0, 0)  # each side's argmax at the last position

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])  # [R, V]
        top1, top5, kl = logits_rows(a, b)
        self.top1 += top1
        self.top5 += top5
        self.kl += kl
        self.next_tokens = (int(a[-1].argmax()), int(b[-1].argmax()))

    def summary(self) -> dict[str, Any]:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "kl": self.kl,
            "top1_rate": sum(self.top1) / len(self.top1),
            "top5_rate": sum(self.top5) / len(self.top5),
            "kl_mean": sum(self.kl) / len(self.kl),
            "kl_max": max(self.kl),
            "next_token_a": self.next_tokens[0],
            "next_token_b": self.next_tokens[1],
        }


# ---- one name, a chunk of rows at a time -----------------------------------------------------------------------------


@dataclass
class NameStats:
    """Everything the verdict on one name needs, accumulated a chunk of rows at a time: the sums of each block of
    positions (the whole name's are their total) and the display metrics. Nothing grows with the prompt but the
    logits' per-position agreement; `reread(lo, hi)` gives per-row sums again, for the first failing position."""

    name: str
    shape: tuple[int, ...]
    positions: list[int] | None  # absolute position of each stored row; None: the name has no position axis
    blocks: list[tuple[int, int]]  # stored-row ranges [start, stop) judged apart (one: the whole name)
    has_oracle: bool
    sums: RowSums  # [n_blocks]: each block's
    reread: Callable[[int, int], RowSums]  # stored rows [lo, hi) -> their per-row sums
    metrics: Metrics = field(default_factory=Metrics)
    nonfinite: NonFinite = field(default_factory=NonFinite)
    logits: Logits | None = None

    def worst_position(self) -> int | None:
        """The position of the largest |B - truth| (a non-finite one first), when the name has a position axis."""
        if self.metrics.worst is None or self.positions is None:
            return None
        return self.positions[self.metrics.worst[1] // max(1, math.prod(self.shape[1:]))]


def causal_keep(n_keys: int, query_positions: torch.Tensor) -> torch.Tensor:
    """[R, K]: True where key j is at or before row r's query position: the part of `scores` judged.

    Real implementations record scores after the causal mask (-inf or the dtype's minimum above the diagonal), the
    harness's before it: zeroing above the diagonal on every side makes both recordings agree. A wrong mask still
    changes `probs`, which is judged whole. A long prompt's sampled rows sit at their own positions; a generation
    step's [T, K] scores are aligned bottom-right (its queries are the last T keys)."""
    return torch.arange(n_keys)[None, :] <= query_positions[:, None]


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
    blocks = position_blocks(positions, n_rows)
    block_of = torch.zeros(n_rows, dtype=torch.long)  # [R]: each stored row's block
    for index, (lo, hi) in enumerate(blocks):
        block_of[lo:hi] = index
    part = canon.parse(name)[2]
    is_scores, is_logits = part == "scores" and len(shape) == 2, part == "logits" and len(shape) >= 1
    full_rows = (rows[-1] + 1) if rows is not None else n_rows  # a [T, T] tensor's T, when rows are sampled
    step = max(1, CHUNK_ELEMENTS // (max(1, math.prod(shape[1:])) if shape else 1))

    def judged(r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b = read_a(r0, r1).double(), read_b(r0, r1).double()
        truth = read_truth(r0, r1).double() if read_truth is not None else a
        if is_scores:
            query = torch.tensor(rows[r0:r1]) if rows is not None else torch.arange(r0, r1) + (shape[1] - full_rows)
            keep = causal_keep(shape[1], query)  # [R, K]
            return a.masked_fill(~keep, 0.0), b.masked_fill(~keep, 0.0), truth.masked_fill(~keep, 0.0)
        return a, b, truth

    def reread(lo: int, hi: int) -> RowSums:
        chunks = [RowSums.of(*_errors(*judged(r0, min(hi, r0 + step)))) for r0 in range(lo, hi, step)]
        return RowSums(torch.cat([c.table for c in chunks]))  # [hi - lo]

    stats = NameStats(name, shape, positions, blocks, read_truth is not None, RowSums.zeros(len(blocks)), reread)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        a, b, truth = judged(r0, r1)  # logits are never masked: A and B as stored
        if is_logits:
            stats.logits = stats.logits or Logits()
            stats.logits.add(a, b)
        stats.nonfinite.add(r0, a, b)
        finite, ref_err, err, t = _errors(a, b, truth)
        stats.metrics.add(r0, b, finite, err, t)
        stats.sums.add_at(block_of[r0:r1], RowSums.of(finite, ref_err, err, t))  # [R] into their blocks
    return stats


# ---- floors pooled over a layer's heads, and propagated through softmax and probs @ v --------------------------------


def group_of(name: str) -> str:
    """Names whose floors are pooled: a per-head name with the same name of its layer's other heads, in the same
    generation step (a prefill's floors say nothing of a decode step's) of the same sequence of a batch."""
    layer, head, part = canon.parse(name)
    if head is None:
        return name
    return canon.scope(name) + f"layers.{layer}.attention.heads.*.{part}"


def _heads_sibling(name: str, part: str) -> str:
    """The same head's `part` in the same step: 'steps.2.layers.0.attention.heads.3.probs', 'v' -> '...heads.3.v'."""
    layer, head, _ = canon.parse(name)
    return canon.scope(name) + canon.head_name(layer, head, part)


def group_floors(ref: Trace, stats: dict[str, NameStats]) -> dict[str, Floor]:
    """The floor each per-head name is pooled with: its layer's heads' pooled floor, and for `probs` and `output` at
    least the floor its head's `scores` (and `v`, or in a decode step the cache's values) imply (`propagated_floor`,
    streamed over the oracle's probs). Names without an oracle get none."""
    heads = [n for n, s in stats.items() if group_of(n) != n and s.has_oracle]
    own = {name: stats[name].sums.total().floor() for name in heads}
    members: dict[str, list[Floor]] = {}
    for name in heads:
        members.setdefault(group_of(name), []).append(own[name])
    pools = {group: pooled(floors) for group, floors in members.items()}
    out = {name: pools[group_of(name)] for name in heads}
    for name in heads:
        part = canon.parse(name)[2]
        probs, scores = _heads_sibling(name, "probs"), _heads_sibling(name, "scores")
        if part not in ("probs", "output") or scores not in own or ORACLE_PREFIX + probs not in ref:
            continue
        keys = ref.shape(probs)[-1]
        candidates = (_heads_sibling(name, "v"), _heads_sibling(name, "cache_v"))
        values = next((n for n in candidates if n in own and ref.shape(n)[0] == keys), None)
        if values is None:
            continue
        floor_s = effective_floor(own[scores], pools[group_of(scores)])
        floor_v = effective_floor(own[values], pools[group_of(values)])
        v = ref[ORACLE_PREFIX + values].double()  # [K, hd]
        model = _streamed_propagation(part, ref, ORACLE_PREFIX + probs, v, floor_s, floor_v)
        out[name] = dataclasses.replace(out[name], error_rms=max(out[name].error_rms, model))
    return out


def _streamed_propagation(
    part: str, ref: Trace, probs_name: str, v: torch.Tensor, floor_s: float, floor_v: float
) -> float:
    """`propagated_floor` over the oracle's probs in the trace, a chunk of rows at a time."""
    n_rows, n_keys = ref.shape(probs_name)
    step = max(1, CHUNK_ELEMENTS // max(1, n_keys))
    total, count = 0.0, 0
    for r0 in range(0, n_rows, step):
        probs = ref.read_rows(probs_name, r0, min(n_rows, r0 + step)).double()  # [R, K]
        s, c = propagation_sums(part, probs, v, floor_s, floor_v)
        total, count = total + s, count + c
    return math.sqrt(total / count) if count else 0.0
