"""What a run cannot see: the RoPE-scaling bugs that a checkpoint, dtype and prompt length leave under the rounding.

Pure, from a ModelConfig, a dtype and a prompt length: each bug class is its own frequency set, its change of the first
judged layer's q_rotated set against the bound the rule (harness/bound.py) gives it there (docs/calibration.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .bound import UNIT_ROUNDOFF, Floor, Sums, allowance
from .config import ModelConfig, rope_frequencies
from .stream import position_blocks

# The reference's own rounding of layer 0's q_rotated (its floor, relative L2), in units of the dtype's unit roundoff.
# Measured 2026-11-29, `verify` on tiny 3.1 (dim 128, head_dim 16), the default 17-token prompt, every head of layer 0:
# bfloat16 0.80-0.99 u (the matmul's output rounded to bfloat16, then RoPE in bfloat16), float16 0.84-1.01 u, float32
# 3.07-4.01 u (the matmul's accumulation: no output rounding dominates it, so it grows with the width; modelled as
# sqrt(dim / 128), not measured on a wide model). The largest of each dtype; float64 taken as float32 (not measured).
FLOOR_ULPS = {"float64": 4.0, "float32": 4.0, "bfloat16": 1.0, "float16": 1.0}
FLOOR_WIDTH = 128  # the dim FLOOR_ULPS' float32 and float64 figures were measured at
GEOMETRIC_STEP = 1.05  # the search for the shortest prompt that separates a class: steps of 5%, then bisection


@dataclass(frozen=True)
class BugClass:
    """One way of getting the checkpoint's RoPE scaling wrong, and whether a run of this dtype and length sees it at
    the first judged layer's q_rotated: its largest relative change there (`effect`) against the bound there
    (`bound`)."""

    id: str
    label: str  # short, for the one line printed
    description: str
    effect: float  # largest relative L2 change of q_rotated the bug causes, over the whole prompt or a block of it
    bound: float  # the bound of that whole prompt or block
    min_tokens: int | None  # the shortest prompt whose run in this dtype separates it (None: none within the context)
    float32_min_tokens: int | None  # the same for a float32 run

    @property
    def ratio(self) -> float:
        return self.effect / self.bound

    @property
    def separable(self) -> bool:
        return self.ratio >= 1.0

    def to_json(self, n_tokens: int) -> dict:
        f32 = self.float32_min_tokens
        return {
            **dataclasses.asdict(self),
            "ratio": self.ratio,
            "separable": self.separable,
            "float32_separable": f32 is not None and f32 <= n_tokens,
        }


@dataclass(frozen=True)
class BlindSpots:
    """The RoPE-scaling bug classes of a checkpoint at one dtype and prompt length (none without scaled RoPE)."""

    dtype: str
    n_tokens: int
    max_seq_len: int
    classes: tuple[BugClass, ...]
    layer: int = 0  # the layer whose q_rotated it reads: 0, or a `--layers A:B` run's A (the first layer it judges)

    @property
    def unseen(self) -> list[BugClass]:
        return [c for c in self.classes if not c.separable]

    def to_json(self) -> dict:
        return {
            "dtype": self.dtype,
            "prompt_tokens": self.n_tokens,
            "where": f"layers.{self.layer} q_rotated, every pair of a head weighing alike",
            "classes": [c.to_json(self.n_tokens) for c in self.classes],
            "unseen": [c.id for c in self.unseen],
        }

    def line(self, dtype_flag: str = "--dtype") -> str | None:
        """The one line `verify` prints, the report shows and the plugin's summary repeats (its flag for the dtype:
        `dtype_flag`); None when nothing is unseen (no scaled RoPE, or every class separable)."""
        unseen = self.unseen
        if not unseen:
            return None
        first, *rest = unseen
        effects = ", ".join(
            [f"{first.label} (it moves layer {self.layer}'s q_rotated by {first.ratio:.2g} of the bound)"]
            + [f"{c.label} ({c.ratio:.2g})" for c in rest]
        )
        return (
            f"blind spots: at {self.n_tokens} tokens in {self.dtype} this run cannot tell these RoPE-scaling bugs "
            f"from rounding: {effects}; {self._remedy(unseen, dtype_flag)}"
        )

    def _remedy(self, unseen: list[BugClass], dtype_flag: str) -> str:
        """The runs that would separate them: float32 on this prompt, or a longer prompt in this dtype."""
        runs = []
        if self.dtype != "float32" and all(c.float32_min_tokens is not None for c in unseen):
            f32 = max(c.float32_min_tokens for c in unseen)
            runs.append(
                f"{dtype_flag} float32" + ("" if f32 <= self.n_tokens else f" with a prompt of >= {f32} tokens")
            )
        if all(c.min_tokens is not None for c in unseen):
            each = ", ".join(f"{c.label} from {c.min_tokens}" for c in unseen)
            runs.append(f"a prompt of >= {max(c.min_tokens for c in unseen)} tokens ({each})")
        if not runs:
            return f"no prompt within the context ({self.max_seq_len} tokens) would in {self.dtype}"
        return " or ".join(runs) + " would"


# ---- the bug classes -------------------------------------------------------------------------------------------------


def bug_classes(config: ModelConfig) -> list[tuple[str, str, str, torch.Tensor]]:
    """(id, label, description, frequencies [head_dim // 2]) of each RoPE-scaling bug class of a checkpoint with scaled
    RoPE (none without): the scaling dropped, and the other of Llama's two factors (32 for 8, 8 for 32)."""
    s = config.rope_scaling
    if s is None:
        return []
    wrong = 8.0 if s.factor == 32.0 else 32.0
    with_factor = dataclasses.replace(config, rope_scaling=dataclasses.replace(s, factor=wrong))
    return [
        (
            "scaling_dropped",
            "scaling dropped",
            "the checkpoint's RoPE scaling dropped: a 3.0-style port running a 3.1+ checkpoint, or a loader that "
            "misses transformers 5's `rope_parameters` in config.json",
            rope_frequencies(dataclasses.replace(config, rope_scaling=None)),
        ),
        (
            f"factor_{wrong:g}_for_{s.factor:g}",
            f"factor {wrong:g} for {s.factor:g}",
            f"RoPE scaling factor {wrong:g} where the checkpoint says {s.factor:g} (a builder hard-coding "
            "Llama 3.2's 32 or Meta's 8)",
            rope_frequencies(with_factor),
        ),
    ]


def rotation_change(freqs: torch.Tensor, bug: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """RMS of |exp(i p f_bug) - exp(i p f)| over positions p in [lo, hi) and every rotation pair: the relative L2
    change of a rotated vector whose pairs weigh alike. lo, hi [S] -> [S]; closed form, no [T, head_dim] tensor.

    mean_p |e^{i p d} - 1|^2 = 2 (1 - a b), a = sin(n d / 2) / (n sin(d / 2)), b = cos((lo + hi - 1) d / 2), written
    as 2 ((1 - a) + a (1 - b)) so that small angles keep their digits."""
    d = (bug.double() - freqs.double()).abs()[None, :]  # [1, half]
    n = (hi - lo).double()[:, None]  # [S, 1]
    x = d / 2
    small = n * x < 1e-3
    safe_x = torch.where(x > 0, x, torch.ones_like(x))
    a = torch.where(small, 1 - (n**2 - 1) * x**2 / 6, torch.sin(n * safe_x) / (n * torch.sin(safe_x)))  # [S, half]
    one_minus_a = torch.where(small, (n**2 - 1) * x**2 / 6, 1 - a)
    one_minus_b = 2 * torch.sin((lo + hi - 1).double()[:, None] * d / 4) ** 2  # 1 - cos(c d), c = (lo + hi - 1) / 2
    mean_square = 2 * (one_minus_a + a * one_minus_b)  # [S, half]
    return mean_square.clamp_min(0).mean(-1).sqrt()  # [S]


# ---- against the bound -----------------------------------------------------------------------------------------------


def q_rotated_bound(config: ModelConfig, dtype: str, n_positions: int) -> float:
    """The rule's bound (harness/bound.py `allowance`) for the first judged layer's q_rotated over `n_positions`
    positions (a whole prompt, or a block of one), its floor FLOOR_ULPS u per value, pooled with the layer's other
    heads."""
    u = UNIT_ROUNDOFF[dtype]
    floor = FLOOR_ULPS[dtype] * u * (math.sqrt(config.dim / FLOOR_WIDTH) if dtype in ("float32", "float64") else 1.0)
    n = n_positions * config.head_dim
    group = Floor(floor, 1.0, n * config.n_heads, n * config.n_heads)
    return allowance(Sums(n=n, n_rounded=n, ref_err2=n * floor**2, truth2=float(n)), dtype=dtype, group=group).rel_l2


def worst_effect(config: ModelConfig, freqs, bug, dtype: str, n_tokens: int) -> tuple[float, float]:
    """(effect, bound) where the bug stands highest against the bound: the whole prompt, or one of the blocks of
    positions the rule judges apart (harness/stream.py `position_blocks`)."""
    spans = [(0, n_tokens)] + (position_blocks(range(n_tokens), n_tokens) if n_tokens > 1 else [])
    lo, hi = (torch.tensor(side) for side in zip(*spans))  # [S]
    effects = rotation_change(freqs, bug, lo, hi).tolist()
    bounds = [q_rotated_bound(config, dtype, b - a) for a, b in spans]
    worst = max(range(len(spans)), key=lambda i: effects[i] / bounds[i])
    return effects[worst], bounds[worst]


def min_tokens(config: ModelConfig, freqs, bug, dtype: str) -> int | None:
    """The shortest prompt (up to the context) whose run in `dtype` separates the bug: 5% steps up from 2 tokens to the
    first that does, then bisection (the effect grows with position while its angles stay under pi)."""

    def separates(n_tokens: int) -> bool:
        effect, bound = worst_effect(config, freqs, bug, dtype, n_tokens)
        return effect >= bound

    below, t = 1, 2
    while not separates(t):
        if t >= config.max_seq_len:
            return None
        below, t = t, min(config.max_seq_len, max(t + 1, int(t * GEOMETRIC_STEP)))
    while t - below > 1:
        middle = (below + t) // 2
        below, t = (below, middle) if separates(middle) else (middle, t)
    return t


def blind_spots(config: ModelConfig, dtype: str, n_tokens: int, first_layer: int = 0) -> BlindSpots:
    """Each RoPE-scaling bug class of the checkpoint: its effect at this length against this dtype's bound, and the
    shortest prompt that would separate it in this dtype and in float32; at the first layer the run judges
    (`first_layer`): 0, or a `--layers A:B` run's A. The same figures hold there: a bug changes every layer's rotation
    alike, and a range's oracle starts at A from the reference's input, so A's floor is that layer's own rounding, as
    layer 0's is in a whole-model run (FLOOR_ULPS)."""
    freqs = rope_frequencies(config)
    classes = []
    for id, label, description, bug in bug_classes(config):
        effect, bound = worst_effect(config, freqs, bug, dtype, n_tokens)
        classes.append(
            BugClass(
                id,
                label,
                description,
                effect,
                bound,
                min_tokens(config, freqs, bug, dtype),
                min_tokens(config, freqs, bug, "float32"),
            )
        )
    return BlindSpots(dtype, n_tokens, config.max_seq_len, tuple(classes), layer=first_layer)


__all__ = ["BlindSpots", "BugClass", "FLOOR_ULPS", "blind_spots", "bug_classes", "rotation_change"]
