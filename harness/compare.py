"""Compare two traces name by name under bf16-aware tolerances and find the first divergence in forward order.

A is the reference side, B the implementation judged. With a float64 oracle in A (names "_oracle.*") each name's
bound is calibrated on the reference's own rounding (harness/bound.py); without one, B is held to A under a fixed
dtype-based bound. Each name is streamed a chunk of rows at a time (harness/stream.py), then judged here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch

from . import names as canon
from .bound import (
    ABS_TERM_ULPS,
    BLOCK_POSITIONS,
    FLOOR_FACTOR,
    POOL_WEIGHT,
    TAIL_Z,
    UNIT_ROUNDOFF,
    Allowance,
    Floor,
    allowance,
    independent_samples,
    less_precise,
)
from .comparable import check_comparable, check_dtypes, check_oracle_dtypes, not_canonical, oracle_side
from .files import atomic_path
from .names import ORACLE_PREFIX
from .stream import NameStats, Reader, accumulate, group_floors
from .trace_file import Trace, load_trace


@dataclass
class NameResult:
    """One name's verdict and metrics; every error is against the truth (the oracle, or A in direct mode)."""

    name: str
    passed: bool
    max_abs: float
    max_rel: float
    rel_l2: float
    cosine: float
    ratio: float  # ||B - truth|| over the largest allowed (its worst block's, if larger): passes when <= 1
    bound: float  # the largest rel_l2 allowed: bound.allowed_rel_l2
    against: str  # "oracle" or "A"
    floor: float | None = None  # the reference's own rel_l2 against the oracle
    floor_ratio: float | None = None  # ratio * FLOOR_FACTOR: the error over the tail-scaled floor (the heat maps)
    dtype_a: str = ""
    dtype_b: str = ""
    layer: int | None = None
    head: int | None = None
    worst_position: int | None = None  # token index of the largest absolute error
    worst_token: str | None = None
    nonfinite: str | None = None  # set when NaN/Inf appear on either side (a failure even on both)
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
    not_canonical: list[str] = field(default_factory=list)  # B-only names first: misspelled, or the user's own

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
            "not_canonical": self.not_canonical,
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


# ---- metrics ---------------------------------------------------------------------------------------------------------


def rel_l2(x: torch.Tensor, truth: torch.Tensor) -> float:
    """||x - truth|| / ||truth|| (0 when both are zero, inf when only the truth is)."""
    diff = float(torch.linalg.vector_norm(x - truth))
    norm = float(torch.linalg.vector_norm(truth))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


# ---- the verdict on one name -----------------------------------------------------------------------------------------


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
    rule = partial(allowance, dtype=less_precise(dtype_a, dtype_b), oracle=stats.has_oracle, rtol=rtol, atol=atol)
    whole = stats.sums.total()
    allowed = rule(whole, group=group, samples=independent_samples(stats.name, stats.positions))
    distance = math.sqrt(whole.err2)
    ratio, passed = allowed.ratio(distance), distance <= allowed.l2
    blocks, first_failing = None, None
    if len(stats.blocks) > 1:
        blocks, first_failing = _judge_blocks(stats, rule, allowed.floor)
        ratio = max([ratio] + [blk["ratio"] for blk in blocks])
        passed = passed and all(blk["ratio"] <= 1 for blk in blocks)
    nonfinite = stats.nonfinite.describe(math.prod(stats.shape))
    if nonfinite is not None:
        passed, ratio = False, math.inf
    worst = stats.worst_position()
    if not passed and first_failing is None:
        first_failing = worst
    layer, head, _ = canon.parse(stats.name)
    return NameResult(
        name=stats.name,
        passed=passed,
        max_abs=stats.metrics.max_abs,
        max_rel=stats.metrics.max_relative(),
        rel_l2=whole.relative(whole.err2),
        cosine=stats.metrics.cosine(whole.truth2),
        ratio=ratio,
        bound=allowed.rel_l2,
        against="oracle" if stats.has_oracle else "A",
        floor=whole.relative(whole.ref_err2) if stats.has_oracle else None,
        floor_ratio=ratio * FLOOR_FACTOR if stats.has_oracle else None,
        dtype_a=dtype_a,
        dtype_b=dtype_b,
        layer=layer,
        head=head,
        worst_position=worst,
        nonfinite=nonfinite,
        logits=stats.logits.summary() if stats.logits is not None and nonfinite is None else None,
        pooled_floor=allowed.floor_rel_l2,
        first_failing_position=first_failing if not passed else None,
        blocks=blocks,
    )


def _judge_blocks(
    stats: NameStats, rule: Callable[..., Allowance], name_floor: Floor | None
) -> tuple[list[dict[str, Any]], int | None]:
    """Each block of positions under the rule, its floor pooled toward the name's: (the blocks' JSON, the first
    failing position, None when every block passes)."""
    blocks, first_failing = [], None
    for index, (lo, hi) in enumerate(stats.blocks):
        s = stats.sums.row(index)
        allowed = rule(s, group=name_floor, samples=independent_samples(stats.name, stats.positions[lo:hi]))
        ratio = allowed.ratio(math.sqrt(s.err2))
        if ratio > 1 and first_failing is None:
            first_failing = _first_row_over(stats, lo, hi, allowed.l2 / math.sqrt(max(s.n, 1)))
        blocks.append(
            {
                "positions": [stats.positions[lo], stats.positions[hi - 1]],
                "rel_l2": s.relative(s.err2),
                "floor": s.relative(s.ref_err2) if stats.has_oracle else None,
                "ratio": ratio,
            }
        )
    return blocks, first_failing


def _first_row_over(stats: NameStats, lo: int, hi: int, per_element: float) -> int:
    """The position of the first stored row in [lo, hi) whose error RMS exceeds `per_element` (else the block's first):
    the block's rows read again (a failing name's, once)."""
    rows = stats.reread(lo, hi)  # [hi - lo]
    over = ((rows.err2 / rows.n.clamp_min(1)).sqrt() > per_element) & (rows.n > 0)  # [hi - lo]
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
    truth = _reader(oracle) if oracle is not None else None
    stats = accumulate(name, _reader(a), _reader(b), truth, tuple(a.shape), rows=rows, start=start)
    return judge(stats, dtype_a=dtype_a, dtype_b=dtype_b, group=group, rtol=rtol, atol=atol)


def _reader(tensor: torch.Tensor) -> Reader:
    return (lambda r0, r1: tensor[r0:r1]) if tensor.dim() else (lambda r0, r1: tensor)


# ---- two traces ------------------------------------------------------------------------------------------------------


def _dtype_of(trace: Trace, run_dtype: object, name: str) -> str:
    """The run's working dtype (attr `dtype`), else the name's own: bf16 runs record some names in float32."""
    return run_dtype if run_dtype in UNIT_ROUNDOFF else trace.dtype(name)


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
        common = [n for n in a.names if n in b and not _is_tokens(n)]
        check_comparable(a, b, common)
        ref, impl, swapped = oracle_side(a, b)
        use_oracle = rtol is None and atol is None
        calibrated = use_oracle and any(n.startswith(ORACLE_PREFIX) for n in ref.extra_names)
        check_dtypes(a, b, calibrated)
        if calibrated:
            check_oracle_dtypes(ref, impl, common)
        results = _judge_names(ref, impl, common, use_oracle=use_oracle, rtol=rtol, atol=atol)
        tokens = _tokens(a, b)
        only_ref = [n for n in ref.names if n not in impl and not _is_tokens(n)]
        only_impl = [n for n in impl.names if n not in ref and not _is_tokens(n)]
        batch_tokens = {canon.split_batch(n)[0]: a[n].tolist() for n in a.names if _is_tokens(n) and n != "tokens"}
        attrs_ref, attrs_impl = ref.attrs, impl.attrs
        unknown = not_canonical(only_impl + common + only_ref, attrs_ref)
    token_texts = _name_worst_tokens(results, tokens, token_text, batch_tokens)
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
        not_canonical=unknown,
    )


def _tokens(a: Trace, b: Trace) -> list[int] | None:
    """The run's token ids: A's `tokens`, else B's, else A's `tokens` attribute."""
    if "tokens" in a or "tokens" in b:
        return a.tokens if "tokens" in a else b.tokens
    return [int(t) for t in a.attrs["tokens"]] if isinstance(a.attrs.get("tokens"), list) else None


def _is_tokens(name: str) -> bool:
    """`tokens`, or a batch's sequence's `batch.{b}.tokens`: the run's inputs, checked, never judged."""
    return canon.split_batch(name)[1] == "tokens"


def _name_worst_tokens(
    results: list[NameResult],
    tokens: list[int] | None,
    token_text: Callable[[int], str] | None,
    batch_tokens: dict[int, list[int]] | None = None,
) -> list[str] | None:
    """Each token's text, when there are tokens and a tokenizer; each result's worst position named by its token (a
    batch's sequence's by that sequence's own)."""
    if tokens is None or token_text is None:
        return None
    token_texts = [token_text(t) for t in tokens]
    texts_of = {b: [token_text(t) for t in ids] for b, ids in (batch_tokens or {}).items()}  # once per sequence
    for r in results:
        sequence = canon.split_batch(r.name)[0]
        texts = token_texts if sequence is None else texts_of.get(sequence, [])
        if r.worst_position is not None and r.worst_position < len(texts):
            r.worst_token = texts[r.worst_position]
    return token_texts


def _judge_names(
    ref: Trace, impl: Trace, common: list[str], *, use_oracle: bool, rtol: float | None, atol: float | None
) -> list[NameResult]:
    """Stream every common name (against the reference's oracle of it when `use_oracle` and it has one), pool the
    per-head floors, then judge each name in forward order."""
    oracles = set(ref.extra_names) if use_oracle else set()
    starts = _step_starts(ref, common)
    read = lambda trace, n: lambda r0, r1: trace.read_rows(n, r0, r1)  # noqa: E731
    stats = {}
    for name in common:
        truth = read(ref, ORACLE_PREFIX + name) if ORACLE_PREFIX + name in oracles else None
        start = starts.get(canon.split_step(name)[0], 0)
        stats[name] = accumulate(
            name, read(ref, name), read(impl, name), truth, ref.shape(name), rows=ref.rows(name), start=start
        )
    groups = group_floors(ref, stats) if use_oracle else {}
    run_ref, run_impl = ref.attrs.get("dtype"), impl.attrs.get("dtype")
    return [
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


__all__ = ["Comparison", "NameResult", "compare_tensors", "compare_traces", "rel_l2", "write_json"]
