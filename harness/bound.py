"""The rule alone: how large an error each name may show, from the reference's own rounding or a fixed table.

Coded once, in `allowance`: its `rel_l2` (`allowed_rel_l2`) is the bound `judge` reports and the tests check.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from . import names as canon

# ---------------------------------------------------------------------------------------------------------------------
# The tolerance table: every constant of the rule, each with the measurement that chose it. The measurements and
# their figures are documented once, in docs/calibration.md ("The constants and their sources", one section each).
#
# One unit: a name's error is its relative L2 error against the truth, ||B - truth|| / ||truth||, over the whole
# tensor; `scores` over their causal part only (row i, keys 0..i: real implementations record them after the mask).
# B passes when its error is at most `allowed_rel_l2`:
#
# Oracle mode, truth = the reference run in float64 (A's "_oracle.NAME"), over the name's n values:
#   own floor   f = RMS(A - truth), the reference's own rounding;
#   group floor g = RMS(A - truth) over the same name of every head of the layer, for a per-head name; for `probs`
#               and a head's `output` at least what the head's scores (and v) floors imply through softmax and
#               probs @ v on the oracle's values (`propagated_floor`); a non-head name is its own group;
#   floor       F = max(f, sqrt((n f^2 + POOL_WEIGHT g^2) / (n + POOL_WEIGHT))): a tensor of 1 to a few values
#               (1-3 token prompts) is held to its layer's heads together, a large one to its own floor;
#   allowed_rel_l2 = FLOOR_FACTOR * tail * (F + ABS_TERM_ULPS * u * max(RMS(truth), RMS(group's truth))) / RMS(truth)
#               = FLOOR_FACTOR * tail * (F / RMS(truth) + ABS_TERM_ULPS * u) for a name judged alone,
#   with u the unit roundoff of the less precise dtype, and tail = 1 + TAIL_Z sqrt(1/(2 n) + 1/(2 n_f)) the
#   small-sample allowance for B's error and for the floor's own estimate (n: the values the reference rounded, at
#   most `independent_samples`; n_f = n, plus POOL_WEIGHT for a pooled floor). F / RMS(truth) is the name's
#   `pooled_floor`; `floor_ratio` = ratio * FLOOR_FACTOR (B's error over the tail-scaled floor) is what the heat maps
#   show. (Computed as FLOOR_FACTOR * tail * per-element floor * sqrt(n) / ||truth||, in that order: the JSON's
#   numbers are those floats.)
# Direct mode (no oracle), truth = A: allowed_rel_l2 = rtol + atol * sqrt(n) / ||A||.
# Long prompts: the same rule again per block of positions (BLOCK_POSITIONS), each block's floor its own pooled
# toward the name's; a name passes when it and every block pass. Every name reports ratio = error / allowed, the
# largest of the whole name's and its blocks': it passes when ratio <= 1.
# ---------------------------------------------------------------------------------------------------------------------

# Unit roundoff (half an ulp at 1) of each dtype a trace can be computed in.
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}

# How many times the (pooled, tail-scaled) floor an implementation may reach. Chosen between the worst correct run
# and the weakest catalogued bug at its own name, both measured with the pooled rule on the tiny checkpoints against
# harness/reference.py (benchmarks/separation.py, tests/test_mutations.py): docs/calibration.md, FLOOR_FACTOR.
FLOOR_FACTOR = 5.0

# Pooling (statistics for small tensors): a per-head name's floor is shrunk toward its group's (its layer's heads,
# and for probs/output the floor its scores and v imply), the group weighing as POOL_WEIGHT values. 64: the group
# decides for a 1-3 token prompt's scores and probs (1-9 values, own weight <= 12%) and fades at the default 17-token
# prompt (289 values, own weight 82%) and beyond. With the own floor alone, correct runs on 1-3 token prompts failed:
# docs/calibration.md, POOL_WEIGHT and "Why pooling".
POOL_WEIGHT = 64

# Small samples: the ratio of an implementation's error RMS over n values to the floor, itself measured on n_f values
# of the reference's rounding, lies above its expectation by chance by up to about 1 + z sqrt(1/(2 n) + 1/(2 n_f))
# (two chi distributions' spread; z = 3.9: a 1-in-10^4 chance per name). n_f: the name's own rounded values, plus
# POOL_WEIGHT when its floor is pooled with a group's. Not fitted: from the distributions (3.8 for one value, 1.04
# for ten thousand); the runs it was checked on: docs/calibration.md, TAIL_Z.
TAIL_Z = 3.9

# Error along the sequence: a name with a position axis is also judged per block of positions, each block against
# its own floor (pooled toward the name's as a group of POOL_WEIGHT values), and passes only when every block does.
# A bug that grows with position (RoPE scaling, angles in low precision) is diluted in a whole-tensor error: the RoPE
# factor 32-for-8 bug at ~4000 tokens was 2.9x the whole-tensor bound at q_rotated, while its error in the last
# positions is several times its average. Blocks of BLOCK_POSITIONS positions, at least MIN_BLOCK_ROWS stored rows
# each (a long prompt's sampled scores/probs rows): prompts up to 2 x BLOCK_POSITIONS - 1 tokens are one block, so the
# rule measured on 1-256 tokens is unchanged there (docs/calibration.md, BLOCK_POSITIONS and MIN_BLOCK_ROWS).
BLOCK_POSITIONS = 256
MIN_BLOCK_ROWS = 8

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
# docs/calibration.md, DIRECT_RTOL and DIRECT_ATOL.
DIRECT_RTOL = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 1e-1, "float16": 1.5e-2}
DIRECT_ATOL = {"float64": 1e-15, "float32": 1e-7, "bfloat16": 4e-3, "float16": 5e-4}
# ---------------------------------------------------------------------------------------------------------------------


def less_precise(*dtypes: str) -> str:
    """The dtype of the larger unit roundoff (float32 when none is known): the rounding both sides may show."""
    known = [d for d in dtypes if d in UNIT_ROUNDOFF]
    return max(known, key=UNIT_ROUNDOFF.__getitem__) if known else "float32"


# ---- floors ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Floor:
    """The reference's own rounding, per element: RMS of (reference - oracle) and RMS of the oracle, over `n` values."""

    error_rms: float
    truth_rms: float
    n: int
    n_rounded: int = 0  # values the reference did not get exactly (the samples of its rounding error)


@dataclass
class Sums:
    """Sums over some values of one name (all of it, or a block of positions): every error, floor and bound comes
    from these."""

    n: int = 0  # finite values (on A, B and the truth)
    n_rounded: int = 0  # of them, where the reference differs from the truth (the samples of its rounding)
    ref_err2: float = 0.0  # sum of (A - truth)^2
    err2: float = 0.0  # sum of (B - truth)^2
    truth2: float = 0.0  # sum of truth^2

    def floor(self) -> Floor:
        if self.n == 0:
            return Floor(0.0, 0.0, 0)
        return Floor(math.sqrt(self.ref_err2 / self.n), math.sqrt(self.truth2 / self.n), self.n, self.n_rounded)

    def relative(self, sum_of_squares: float) -> float:
        """sqrt(sum_of_squares / truth2): `err2`'s is B's relative L2 error, `ref_err2`'s the reference's."""
        if self.truth2 == 0.0:
            return 0.0 if sum_of_squares == 0.0 else math.inf
        return math.sqrt(sum_of_squares / self.truth2)


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


def propagated_floor(part: str, probs: torch.Tensor, v: torch.Tensor, floor_scores: float, floor_v: float) -> float:
    """RMS error of `probs` or of the head's `output` that independent errors of RMS `floor_scores` on the scores
    (and `floor_v` on v) would cause: a rounding model on the oracle's values, for heads too small to show their own.

    Softmax: dp_ij = p_ij (ds_ij - sum_k p_ik ds_ik), so E dp_ij^2 = fs^2 p_ij^2 (1 - 2 p_ij + sum_k p_ik^2).
    Output o_i = sum_j p_ij v_j: do_i = sum_j p_ij ds_ij (v_j - o_i) + sum_j p_ij dv_j, so
    E |do_i|^2 = fs^2 sum_j p_ij^2 |v_j - o_i|^2 + fv^2 hd sum_j p_ij^2.
    """
    total, count = propagation_sums(part, probs, v, floor_scores, floor_v)
    return math.sqrt(total / count) if count else 0.0


def propagation_sums(part: str, probs: torch.Tensor, v: torch.Tensor, fs: float, fv: float) -> tuple[float, int]:
    """(sum of the expected squared errors, how many values) of `propagated_floor` over rows of probs [R, K]
    (v [K, hd]): a long prompt's probs are added up a chunk of rows at a time."""
    p2 = probs.pow(2)  # [R, K]
    if part == "probs":
        expected = p2 * (1 - 2 * probs + p2.sum(-1, keepdim=True))  # [R, K]
        return fs**2 * float(expected.clamp_min(0).sum()), probs.numel()
    out = probs @ v  # [R, hd]
    # sum_j p_ij^2 |v_j - o_i|^2, expanded: no [R, K, hd] temporary at long prompts
    spread = p2 @ v.pow(2).sum(-1) - 2 * ((p2 @ v) * out).sum(-1) + p2.sum(-1) * out.pow(2).sum(-1)  # [R]
    per_row = fs**2 * spread.clamp_min(0) + fv**2 * v.shape[-1] * p2.sum(-1)  # [R]
    return float(per_row.sum()), out.numel()


# ---- the small-sample tail ------------------------------------------------------------------------------------------


def small_sample_factor(n: int, n_floor: int | None = None) -> float:
    """How far above its expectation an error RMS over `n` samples may lie by chance, relative to a floor measured on
    `n_floor` samples (None: a known floor): 1 + TAIL_Z sqrt(1/(2 n) + 1/(2 n_floor)) (chi distributions' spread)."""
    spread = 1 / (2 * max(n, 1)) + (0.0 if n_floor is None else 1 / (2 * max(n_floor, 1)))
    return 1.0 + TAIL_Z * math.sqrt(spread)


def independent_samples(name: str, positions: list[int] | None) -> int | None:
    """A head's `output` inherits its errors from its probs: row i is sum_j p_ij v_j, so an error in the i + 1 causal
    probs of the row moves all head_dim values together. Its independent samples are at most its rows' causal probs,
    sum (position + 1), not rows x head_dim (a 3-token prompt: 6, not 48). None for every other name.

    Why: docs/calibration.md, "Head outputs' samples"."""
    _, head, part = canon.parse(name)
    if head is None or part != "output" or positions is None:
        return None
    return sum(p + 1 for p in positions)


# ---- the bound -------------------------------------------------------------------------------------------------------


def direct_bound(truth2: float, n: int, dtype: str, rtol: float | None, atol: float | None) -> float:
    """Direct mode's largest relative L2 error: rtol + atol * sqrt(n) / ||A|| (the table's, unless given)."""
    rtol = DIRECT_RTOL[dtype] if rtol is None else rtol
    atol = DIRECT_ATOL[dtype] if atol is None else atol
    norm, absolute = math.sqrt(truth2), atol * math.sqrt(n)
    return rtol + (absolute / norm if norm > 0 else (math.inf if absolute > 0 else 0.0))


@dataclass(frozen=True)
class Allowance:
    """What the rule allows some values of one name: the largest ||B - truth||, and the truth's norm it is relative
    to. Both are kept: a name's ratio is ||B - truth|| / l2 and its bound l2 / norm, each one rounding from them."""

    l2: float  # the largest ||B - truth|| allowed
    norm: float  # ||truth||
    floor: Floor | None = None  # oracle mode: the floor held to, per element (its own pooled toward its group's)

    @property
    def rel_l2(self) -> float:
        """The largest relative L2 error allowed: the name's `bound` (inf when the truth is all zeros)."""
        return self.l2 / self.norm if self.norm > 0 else math.inf

    @property
    def floor_rel_l2(self) -> float | None:
        """The floor held to as a relative L2 error (without the absolute term): the name's `pooled_floor`."""
        if self.floor is None or not self.norm > 0:
            return None
        return self.floor.error_rms * math.sqrt(self.floor.n) / self.norm

    def ratio(self, distance: float) -> float:
        """`distance` = ||B - truth|| over the largest allowed: passes at <= 1."""
        if self.l2 > 0:
            return distance / self.l2
        return 0.0 if distance == 0 else math.inf


def allowance(
    sums: Sums,
    *,
    dtype: str,
    oracle: bool = True,
    group: Floor | None = None,
    samples: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> Allowance:
    """The rule on the values summed in `sums`: against the oracle (the reference's floor in `sums`, pooled with
    `group`'s when given; `samples` the independent errors when fewer than the rounded values), or, when not
    `oracle`, direct mode's rtol/atol (the table's for `dtype` unless given)."""
    norm = math.sqrt(sums.truth2)
    if not oracle:  # an all-zero truth allows B only itself: its relative bound (inf) times a norm of 0 is no distance
        return Allowance(direct_bound(sums.truth2, sums.n, dtype, rtol, atol) * norm if norm > 0 else 0.0, norm)
    own = sums.floor()
    pool = own if group is None else group
    floor = effective_floor(own, pool)
    per_element = floor + ABS_TERM_ULPS * UNIT_ROUNDOFF[dtype] * max(own.truth_rms, pool.truth_rms)
    n = own.n_rounded if samples is None else min(own.n_rounded, samples)
    tail = small_sample_factor(n, n + (0 if group is None else POOL_WEIGHT))
    allowed = FLOOR_FACTOR * tail * per_element * math.sqrt(own.n)
    return Allowance(allowed, norm, dataclasses.replace(own, error_rms=floor))


def allowed_rel_l2(
    sums: Sums,
    *,
    dtype: str,
    oracle: bool = True,
    group: Floor | None = None,
    samples: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> float:
    """The largest relative L2 error ||B - truth|| / ||truth|| the rule allows the values summed in `sums`: the
    `bound` that `judge` reports (arguments as `allowance`)."""
    return allowance(sums, dtype=dtype, oracle=oracle, group=group, samples=samples, rtol=rtol, atol=atol).rel_l2
