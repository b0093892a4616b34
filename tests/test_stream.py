"""Reading two traces a chunk of rows at a time (harness/stream.py): the verdict's sums by name, the causal part of
scores, blocks of positions, non-finite values, the display metrics and the logits rows.

Tensors are made here in memory and read through `accumulate` as compare reads a trace's rows; expected values are
computed on the whole tensors directly.
"""

from __future__ import annotations

import math

import pytest
import torch

from harness import stream
from harness.bound import BLOCK_POSITIONS
from harness.stream import RowSums, accumulate, name_positions, position_blocks
from tests.helpers import assert_expected


def reader(x: torch.Tensor):
    return lambda r0, r1: x[r0:r1]


def stats_of(name: str, a: torch.Tensor, b: torch.Tensor, truth: torch.Tensor | None = None, **kwargs):
    return accumulate(
        name, reader(a), reader(b), reader(truth) if truth is not None else None, tuple(a.shape), **kwargs
    )


def test_row_sums_are_read_by_name():
    finite = torch.tensor([[True, True], [True, False]])
    ref_err = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    err = torch.tensor([[1.0, 1.0], [3.0, 0.0]], dtype=torch.float64)
    truth = torch.tensor([[1.0, 2.0], [2.0, 0.0]], dtype=torch.float64)
    rows = RowSums.of(finite, ref_err, err, truth)  # [2]
    assert_expected(rows.n, torch.tensor([2.0, 1.0]), what="finite values per row")
    assert_expected(rows.err2, torch.tensor([2.0, 9.0]), what="sum (B - truth)^2 per row")
    total = rows.total()
    assert (total.n, total.n_rounded, total.ref_err2, total.err2, total.truth2) == (3, 2, 5.0, 11.0, 9.0), total
    assert rows.row(1).err2 == 9.0 and rows.row(1).n == 1


def test_the_sums_of_a_name_are_its_squared_errors_against_the_truth():
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(10, 6, generator=g, dtype=torch.float64)
    a, b = truth + 1e-3 * torch.randn(10, 6, generator=g, dtype=torch.float64), truth * 1.01
    s = stats_of("layers.0.output", a, b, truth).sums.total()
    assert s.n == 60 and s.n_rounded == 60
    assert s.err2 == pytest.approx(float((b - truth).pow(2).sum()), rel=1e-12)
    assert s.ref_err2 == pytest.approx(float((a - truth).pow(2).sum()), rel=1e-12)
    assert s.truth2 == pytest.approx(float(truth.pow(2).sum()), rel=1e-12)


def test_scores_are_judged_on_their_causal_part_only():
    """Recorded after the mask (-inf above the diagonal) or before it: the same sums."""
    g = torch.Generator().manual_seed(1)
    truth = torch.randn(5, 5, generator=g, dtype=torch.float64)
    a, b = truth + 1e-3, truth + 2e-3
    masked = b.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    name = "layers.0.attention.heads.0.scores"
    whole, causal = stats_of(name, a, b, truth), stats_of(name, a, masked, truth)
    assert causal.sums.total() == whole.sums.total() and causal.nonfinite.count == 0
    assert whole.sums.total().n == 5 * 5, "values masked on every side count as finite zeros"
    assert whole.sums.total().err2 == pytest.approx(15 * 2e-3**2, rel=1e-9), "15 causal values of 25"


def test_positions_of_a_name_follow_its_axes():
    assert name_positions("layers.0.output", (3, 16), None) == [0, 1, 2]
    assert name_positions("steps.2.layers.0.output", (1, 16), None, start=6) == [6]
    assert name_positions("steps.2.layers.0.attention.heads.0.cache_v", (7, 4), None, start=6) == list(range(7))
    assert name_positions("layers.0.attention.heads.0.scores", (1030, 1030), [0, 500, 1029]) == [0, 500, 1029]


def test_blocks_of_positions_start_at_two_blocks_worth():
    short = list(range(2 * BLOCK_POSITIONS - 1))
    assert position_blocks(short, len(short)) == [(0, len(short))], "a short prompt is one block"
    long = list(range(4096))
    blocks = position_blocks(long, 4096)
    assert len(blocks) == 4096 // BLOCK_POSITIONS and blocks[-1] == (4096 - BLOCK_POSITIONS, 4096)
    assert position_blocks(None, 9) == [(0, 9)], "a name without a position axis is one block"


def test_each_block_sums_its_own_rows():
    n = 2 * BLOCK_POSITIONS
    truth = torch.ones(n, 4, dtype=torch.float64)
    b = truth.clone()
    b[BLOCK_POSITIONS:] += 0.5  # the second block only
    stats = stats_of("layers.0.output", truth, b, truth)
    assert stats.blocks == [(0, BLOCK_POSITIONS), (BLOCK_POSITIONS, n)]
    assert stats.sums.row(0).err2 == 0.0 and stats.sums.row(1).err2 == BLOCK_POSITIONS * 4 * 0.25
    assert_expected(stats.reread(BLOCK_POSITIONS - 1, BLOCK_POSITIONS + 1).err2, torch.tensor([0.0, 1.0]))


def test_chunks_do_not_change_the_sums(monkeypatch):
    g = torch.Generator().manual_seed(2)
    truth = torch.randn(300, 16, generator=g, dtype=torch.float64)
    a, b = truth + 1e-2 * torch.randn(300, 16, generator=g), truth + 2e-2 * torch.randn(300, 16, generator=g)
    whole = stats_of("layers.0.output", a, b, truth)
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 100)  # 6 rows a chunk
    chunked = stats_of("layers.0.output", a, b, truth)
    for field in ("n", "n_rounded", "ref_err2", "err2", "truth2"):
        assert getattr(chunked.sums.total(), field) == pytest.approx(getattr(whole.sums.total(), field), rel=1e-12)
    assert chunked.metrics.worst == whole.metrics.worst and chunked.metrics.max_abs == whole.metrics.max_abs


def test_non_finite_values_say_on_which_side_they_are():
    x = torch.zeros(3, 4)
    nan = x.clone()
    nan[1, 2] = float("nan")
    only_b = stats_of("layers.0.output", x, nan).nonfinite
    assert only_b.describe(12) == "1 of 12 values non-finite in B only (first at index (1, 2): A=0.0, B=nan)"
    assert "on both sides" in stats_of("layers.0.output", nan, nan).nonfinite.describe(12)
    assert stats_of("layers.0.output", x, x).nonfinite.describe(12) is None


def test_the_display_metrics_and_the_worst_position():
    truth = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    b = truth.clone()
    b[2, 1] += 0.6
    stats = stats_of("layers.0.output", truth, b, truth)
    assert stats.metrics.max_abs == pytest.approx(0.6) and stats.metrics.max_relative() == pytest.approx(0.1)
    assert stats.worst_position() == 2
    assert stats.metrics.cosine(stats.sums.total().truth2) == pytest.approx(
        float((b * truth).sum() / (b.norm() * truth.norm())), rel=1e-12
    )
    assert stats_of("layers.0.output", truth * 0, truth * 0).metrics.cosine(0.0) == 1.0


def test_logits_rows_count_agreement_and_kl():
    a = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    logits = stats_of("logits", a, b).logits.summary()
    assert logits["top1"] == [True, False] and logits["top1_rate"] == 0.5 and logits["kl"][0] == 0.0
    assert logits["kl"][1] > 0 and logits["next_token_a"] == 0 and logits["next_token_b"] == 2
    assert math.isclose(logits["kl_mean"], logits["kl"][1] / 2)
