"""The rule alone (harness/bound.py): `allowed_rel_l2` in oracle and direct mode, pooling, the small-sample tail.

Expected values are the formulas of the tolerance table at the top of harness/bound.py, worked by hand here; the
sums are made up, as a name's streamed sums would be (tests/test_stream.py makes them from tensors).
"""

from __future__ import annotations

import math

import pytest

from harness.bound import (
    ABS_TERM_ULPS,
    DIRECT_ATOL,
    DIRECT_RTOL,
    FLOOR_FACTOR,
    POOL_WEIGHT,
    UNIT_ROUNDOFF,
    Allowance,
    Floor,
    Sums,
    allowance,
    allowed_rel_l2,
    effective_floor,
    less_precise,
    small_sample_factor,
)

U = UNIT_ROUNDOFF["bfloat16"]


def sums_with(floor: float, n: int, truth_rms: float = 3.0, err: float = 0.0) -> Sums:
    """Sums over n values of RMS `truth_rms`, the reference at relative error `floor`, B at `err`, every value
    rounded."""
    truth2 = n * truth_rms**2
    return Sums(n=n, n_rounded=n, ref_err2=floor**2 * truth2, err2=err**2 * truth2, truth2=truth2)


def test_a_name_judged_alone_is_allowed_floor_factor_times_tail_times_its_floor_and_the_absolute_term():
    tail = small_sample_factor(384, 384)  # B's 384 values and the floor's 384 alike
    expected = FLOOR_FACTOR * tail * (0.01 + ABS_TERM_ULPS * U)
    assert allowed_rel_l2(sums_with(0.01, 384), dtype="bfloat16") == pytest.approx(expected, rel=1e-12)


def test_the_bound_is_computed_in_todays_order_of_operations():
    """FLOOR_FACTOR * tail * per-element floor * sqrt(n) / ||truth||, left to right: the JSON's floats are these."""
    s = sums_with(0.0123, 97, truth_rms=1.7)
    own = s.floor()
    per_element = effective_floor(own, own) + ABS_TERM_ULPS * U * own.truth_rms
    allowed = FLOOR_FACTOR * small_sample_factor(97, 97) * per_element * math.sqrt(97)
    assert allowed_rel_l2(s, dtype="bfloat16") == allowed / math.sqrt(s.truth2)


def test_a_lucky_one_value_name_is_held_to_its_group():
    """A 1-value `scores` whose reference happened to round exactly: its layer's heads decide (pooled as 64 values)."""
    lucky = Sums(n=1, n_rounded=1, ref_err2=1e-18, truth2=1.0)
    group = Floor(error_rms=1e-2, truth_rms=1.0, n=8, n_rounded=8)
    pooled_floor = math.sqrt((1e-18 + POOL_WEIGHT * 1e-4) / (1 + POOL_WEIGHT))
    expected = FLOOR_FACTOR * small_sample_factor(1, 1 + POOL_WEIGHT) * (pooled_floor + ABS_TERM_ULPS * U)
    assert allowed_rel_l2(lucky, dtype="bfloat16", group=group) == pytest.approx(expected, rel=1e-12)
    alone = allowed_rel_l2(lucky, dtype="bfloat16")
    assert alone < expected / 5, "alone, its own (lucky) floor would leave it little but the absolute term"


def test_a_large_name_is_held_to_its_own_floor_not_its_group():
    big, group = sums_with(3e-3, 100_000, truth_rms=1.0), Floor(1e-2, 1.0, 800_000, 800_000)
    allowed = allowance(big, dtype="float32", group=group)
    assert allowed.floor.error_rms == pytest.approx(3e-3, rel=0.01)


def test_fewer_independent_samples_widen_the_tail():
    """A 3-token head output: 48 values, 6 independent (its causal probs); the bound scales with the tail."""
    s = sums_with(0.02, 48)
    ratio = allowed_rel_l2(s, dtype="bfloat16", samples=6) / allowed_rel_l2(s, dtype="bfloat16")
    assert ratio == pytest.approx(small_sample_factor(6, 6) / small_sample_factor(48, 48), rel=1e-12)


def test_direct_mode_is_rtol_plus_atol_per_value_over_the_norm():
    s = Sums(n=100, truth2=4.0)
    expected = DIRECT_RTOL["bfloat16"] + DIRECT_ATOL["bfloat16"] * 10 / 2
    assert allowed_rel_l2(s, dtype="bfloat16", oracle=False) == pytest.approx(expected, rel=1e-12)
    assert allowed_rel_l2(s, dtype="bfloat16", oracle=False, rtol=1e-3, atol=0.0) == pytest.approx(1e-3, rel=1e-12)


def test_an_all_zero_truth_allows_any_relative_error():
    zero = Sums(n=10, n_rounded=0)
    assert allowed_rel_l2(zero, dtype="float32") == math.inf
    assert allowed_rel_l2(zero, dtype="float32", oracle=False) == math.inf


def test_an_all_zero_truth_allows_no_distance_in_either_mode():
    """Only B = truth passes an all-zero truth: direct mode's inf x 0 is no distance (not NaN, which fails even 0)."""
    zero = Sums(n=10, n_rounded=10)
    for oracle in (True, False):
        allowed = allowance(zero, dtype="bfloat16", oracle=oracle)
        assert allowed.l2 == 0.0 and allowed.rel_l2 == math.inf, oracle
        assert (allowed.ratio(0.0), allowed.ratio(1e-30)) == (0.0, math.inf), oracle


def test_an_allowance_gives_the_ratio_and_the_bound_from_the_same_two_numbers():
    allowed = Allowance(l2=2.0, norm=4.0, floor=Floor(0.1, 1.0, 16))
    assert allowed.rel_l2 == 0.5 and allowed.ratio(2.0) == 1.0 and allowed.ratio(1.0) == 0.5
    assert allowed.floor_rel_l2 == pytest.approx(0.1 * 4 / 4)
    nothing = Allowance(l2=0.0, norm=0.0)
    assert nothing.ratio(0.0) == 0.0 and nothing.ratio(1e-9) == math.inf and nothing.floor_rel_l2 is None


def test_the_less_precise_dtype_sets_the_unit_roundoff():
    assert less_precise("float32", "bfloat16") == "bfloat16" and less_precise("float16", "float32") == "float16"
    assert less_precise("int64", "") == "float32", "unknown dtypes fall back to float32"


def test_sums_give_the_floor_per_element_and_relative_errors():
    s = Sums(n=4, n_rounded=3, ref_err2=4e-4, err2=1e-2, truth2=16.0)
    assert s.floor() == Floor(error_rms=1e-2, truth_rms=2.0, n=4, n_rounded=3)
    assert s.relative(s.err2) == pytest.approx(0.025) and s.relative(s.ref_err2) == pytest.approx(0.005)
    assert Sums().relative(0.0) == 0.0 and Sums().relative(1.0) == math.inf
