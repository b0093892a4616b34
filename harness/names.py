"""The canonical names of a Llama-3 forward: one table (`PARTS`) of their order, axes, shapes and which rows a long
one keeps; the scratch forward, the reference, the comparator, the tests, the golden files and the report read it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# Long prompts: a [T, K] per-head tensor (scores, probs) is kept whole up to FULL_SQUARE_MAX_T query rows (4 MiB in
# float32 at K = T); beyond, only SAMPLED_ROWS query rows, evenly spaced with the first and the last, are stored, with
# their positions in the dataset's `rows` attribute. At 8192 tokens one head's scores and probs would take 512 MiB (an
# 8B has 1024 heads); 64 rows take 4 MiB. Logits [T, vocab] likewise past FULL_LOGITS_MAX_ELEMENTS (64 MiB in float32;
# the last row, the next-token prediction, is always kept). Both sides of a comparison sample the same rows (a function
# of T alone), and every [T, head_dim] tensor (q, k, rotated q/k, outputs) stays whole: a position-dependent bug (RoPE)
# shows there at every position. Read at call time (tests lower them).
FULL_SQUARE_MAX_T = 1024
FULL_LOGITS_MAX_ELEMENTS = 1 << 24
SAMPLED_ROWS = 64


@dataclass(frozen=True)
class Part:
    """One canonical name's last part: where it sits, its axes, and whether a long one keeps only sampled rows.

    `level`: "model" (`NAME`), "layer" (`layers.{l}.NAME`) or "head" (`layers.{l}.attention.heads.{h}.NAME`).
    Axes: T tokens (the step's new ones in generation), K key positions (= T outside generation; start_pos + T in a
    generation step: every position the step attends to), and config fields by their size (`AXIS_SIZES`).
    """

    name: str
    level: str
    axes: tuple[str, ...]
    steps_only: bool = False  # recorded in generation steps only (`steps.{s}.`): the KV cache a head attends over
    keeps_sampled_rows: bool = False  # past the bounds above, a trace keeps SAMPLED_ROWS rows of it (`keeps_every_row`)


# Every canonical part, in forward order: the one table.
PARTS = (
    Part("tokens", "model", ("T",)),
    Part("embeddings", "model", ("T", "dim")),
    Part("attention_norm", "layer", ("T", "dim")),
    Part("q", "head", ("T", "head_dim")),
    Part("k", "head", ("T", "head_dim")),
    Part("v", "head", ("T", "head_dim")),
    Part("q_rotated", "head", ("T", "head_dim")),
    Part("k_rotated", "head", ("T", "head_dim")),
    # after the step appended its keys and values: rotated keys [K, hd] and values [K, hd], before the scores they feed
    Part("cache_k", "head", ("K", "head_dim"), steps_only=True),
    Part("cache_v", "head", ("K", "head_dim"), steps_only=True),
    Part("scores", "head", ("T", "K"), keeps_sampled_rows=True),
    Part("probs", "head", ("T", "K"), keeps_sampled_rows=True),
    Part("output", "head", ("T", "head_dim")),
    Part("attention.output", "layer", ("T", "dim")),
    Part("attention_residual", "layer", ("T", "dim")),
    Part("ffn_norm", "layer", ("T", "dim")),
    Part("feed_forward.gate", "layer", ("T", "ffn_dim")),
    Part("feed_forward.up", "layer", ("T", "ffn_dim")),
    Part("feed_forward.hidden", "layer", ("T", "ffn_dim")),
    Part("feed_forward.output", "layer", ("T", "dim")),
    Part("output", "layer", ("T", "dim")),
    Part("norm", "model", ("T", "dim")),
    Part("logits", "model", ("T", "vocab"), keeps_sampled_rows=True),
)
AXIS_SIZES = {"dim": "dim", "vocab": "vocab_size", "ffn_dim": "ffn_dim", "head_dim": "head_dim"}  # axis -> config field


def _order(level: str, inner: str, marker: str) -> tuple[str, ...]:
    """The parts of `level` in forward order, with `marker` where the parts of the `inner` level sit."""
    out: list[str] = []
    for p in PARTS:
        if p.level == level:
            out.append(p.name)
        elif p.level == inner and marker not in out:
            out.append(marker)
    return tuple(out)


# Read from the table: per query head h of layer l (outside generation; in a step also CACHE_NAMES); per layer, with
# "heads" where the per-head names sit; the whole model, with "layers" where the layers sit.
HEAD_NAMES = tuple(p.name for p in PARTS if p.level == "head" and not p.steps_only)
CACHE_NAMES = tuple(p.name for p in PARTS if p.steps_only)
LAYER_NAMES = _order("layer", "head", "heads")
_HEAD_ORDER = tuple(p.name for p in PARTS if p.level == "head")
_MODEL_ORDER = _order("model", "layer", "layers")
_BY_NAME = {p.name: p for p in PARTS}  # "output": the layer's (a head's is looked up by level first)
_HEAD_PARTS = {p.name: p for p in PARTS if p.level == "head"}

# Names whose first part starts with RESERVED_PREFIX are the harness's own extras, not trace names: the float64
# oracle's values of NAME are stored as ORACLE_PREFIX + NAME ("_oracle.layers.0.output").
RESERVED_PREFIX = "_"
ORACLE_PREFIX = RESERVED_PREFIX + "oracle."

# A name's scope: the sequence of a batch (`batch.{b}.`, harness/batch.py), then the generation step (`steps.{s}.`).
_SCOPE_RE = re.compile(r"^(?:batch\.(\d+)\.)?(?:steps\.(\d+)\.)?(.+)$")
_HEAD_RE = re.compile(r"^layers\.(\d+)\.attention\.heads\.(\d+)\.(\w+)$")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def head_parts(in_step: bool) -> tuple[str, ...]:
    """A head's parts in forward order: in a generation step with the cache it attends over, else without."""
    return _HEAD_ORDER if in_step else HEAD_NAMES


def layer_parts() -> tuple[str, ...]:
    """A layer's own parts (not its heads') in forward order."""
    return tuple(p for p in LAYER_NAMES if p != "heads")


def layer_name(layer: int, part: str) -> str:
    return f"layers.{layer}.{part}"


def head_name(layer: int, head: int, part: str) -> str:
    return f"layers.{layer}.attention.heads.{head}.{part}"


def step_name(step: int, name: str) -> str:
    """A name in generation step `step` (0: the prefill of the prompt; s >= 1: decode step s, one new token)."""
    return f"steps.{step}.{name}"


def split_step(name: str) -> tuple[int | None, str]:
    """'steps.3.layers.0.q' -> (3, 'layers.0.q'); a name outside generation -> (None, name). A sequence's name in a
    batch drops its `batch.{b}.` too: 'batch.1.steps.3.layers.0.q' -> (3, 'layers.0.q') (`split_batch` gives b)."""
    m = _SCOPE_RE.match(name)
    return (None if m[2] is None else int(m[2])), m[3]


def batch_name(sequence: int, name: str) -> str:
    """A name of sequence `sequence` of a batch (`--prompts`): 'batch.{b}.NAME' (NAME may be a step's)."""
    return f"batch.{sequence}.{name}"


def split_batch(name: str) -> tuple[int | None, str]:
    """'batch.1.steps.0.norm' -> (1, 'steps.0.norm'); a name outside a batch -> (None, name)."""
    m = _SCOPE_RE.match(name)
    return (None, name) if m[1] is None else (int(m[1]), name.split(".", 2)[2])


def scope(name: str) -> str:
    """What a name's base sits in: 'batch.1.steps.2.layers.0.output' -> 'batch.1.steps.2.'; '' outside both."""
    return name[: len(name) - len(split_step(name)[1])]


def is_extra(name: str) -> bool:
    """A harness extra extending a name ('_oracle.norm'), as opposed to a name or a bare extra ('_generated')."""
    return name.startswith(RESERVED_PREFIX) and "." in name


def canonical_names(n_layers: int, n_heads: int, *, steps: int | None = None) -> Iterator[str]:
    """Every canonical name of a model, in forward order (the order 'first divergence' uses).

    With `steps` (a generation of `steps` decode steps after the prefill): `tokens`, then each step's names
    `steps.{s}.NAME`, s = 0 .. steps, step-major, the head names of a step including the cache's.
    """
    if steps is not None:
        yield "tokens"
        for step in range(steps + 1):
            yield from (step_name(step, n) for n in _names(n_layers, n_heads, in_step=True) if n != "tokens")
        return
    yield from _names(n_layers, n_heads, in_step=False)


def _names(n_layers: int, n_heads: int, in_step: bool) -> Iterator[str]:
    for top in _MODEL_ORDER:
        if top != "layers":
            yield top
            continue
        for layer in range(n_layers):
            for lpart in LAYER_NAMES:
                if lpart != "heads":
                    yield layer_name(layer, lpart)
                    continue
                for head in range(n_heads):
                    yield from (head_name(layer, head, hpart) for hpart in head_parts(in_step))


def parse(name: str) -> tuple[int | None, int | None, str]:
    """'layers.3.attention.heads.7.q' -> (3, 7, 'q'); 'layers.3.ffn_norm' -> (3, None, 'ffn_norm'); 'norm' -> (None,
    None, 'norm'). A step's name parses as its base name ('steps.2.layers.3.ffn_norm' -> (3, None, 'ffn_norm'));
    `split_step` gives the step.
    """
    name = split_step(name)[1]
    if m := _HEAD_RE.match(name):
        return int(m[1]), int(m[2]), m[3]
    if m := _LAYER_RE.match(name):
        return int(m[1]), None, m[2]
    return None, None, name


def part(name: str) -> Part | None:
    """The table's row for a name (a step's by its base name), None for a name it does not know (extras included)."""
    _, head, last = parse(name)
    return (_HEAD_PARTS.get(last) if head is not None else None) or _BY_NAME.get(last)


def order_key(name: str) -> tuple:
    """Sort key that puts any names, canonical or extra, in forward order: generation steps step-major (every name of
    step s before any of step s + 1), after the names outside generation (`tokens`); a batch's sequences in order at
    each name (the first divergence is the earliest point in the forward, then the first sequence there)."""
    step, base = split_step(name)
    step_key = -1 if step is None else step
    sequence = split_batch(name)[0]
    batch_key = -1 if sequence is None else sequence  # a batch's sequences after one another at each name
    layer, head, last = parse(base)
    if layer is None:
        top = _index(_MODEL_ORDER, last) if last != "layers" else len(_MODEL_ORDER)  # the marker is no name
        return (step_key, top, 0, 0, 0, 0, last, batch_key)
    top = _MODEL_ORDER.index("layers")
    if head is not None:
        return (step_key, top, layer, LAYER_NAMES.index("heads"), head, _index(_HEAD_ORDER, last), last, batch_key)
    return (step_key, top, layer, _index(LAYER_NAMES, last), 0, 0, last, batch_key)


def _index(order: tuple[str, ...], name: str) -> int:
    """Where `name` sits in `order`; after every part there when it is not one."""
    return order.index(name) if name in order else len(order)


def axes(name: str) -> tuple[str, ...] | None:
    """Axis names of a canonical name (None for names we do not know). K (key positions) is T outside generation."""
    found = part(name)
    if found is None:
        return None
    if split_step(name)[0] is None:
        return tuple("T" if a == "K" else a for a in found.axes)
    return found.axes


def shape_of(name: str, config: Any, n_tokens: int, start_pos: int = 0) -> tuple[int, ...] | None:
    """The shape `name` has for a forward of `n_tokens` new tokens at positions start_pos .. (a generation step's; 0 and
    every token outside generation) of a model of `config`; None for names not canonical for that model."""
    layer, head, _ = parse(name)
    found = axes(name)
    if (
        found is None
        or (layer is not None and layer >= config.n_layers)
        or (head is not None and head >= config.n_heads)
    ):
        return None
    sizes = {"T": n_tokens, "K": start_pos + n_tokens, **{a: getattr(config, f) for a, f in AXIS_SIZES.items()}}
    return tuple(sizes[a] for a in found)


def step_span(n_prompt: int, step: int) -> tuple[int, int]:
    """(start_pos, T) of generation step `step` after a prompt of `n_prompt` tokens: the prefill (0) covers the prompt,
    decode step s >= 1 one token."""
    return (0, n_prompt) if step == 0 else (n_prompt + step - 1, 1)


def keeps_every_row(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a trace keeps every row of `name` recorded with `shape` (an extra by the name it extends): all but a
    long [T, K] square past FULL_SQUARE_MAX_T rows and long logits past FULL_LOGITS_MAX_ELEMENTS elements."""
    found = part(name.split(".", 1)[1] if is_extra(name) else name)
    if found is None or not found.keeps_sampled_rows or len(shape) != 2:
        return True
    n_rows, n_columns = shape
    if found.axes[-1] == "K":  # a square of positions: bounded by its rows
        return n_rows <= FULL_SQUARE_MAX_T
    return n_rows * n_columns <= FULL_LOGITS_MAX_ELEMENTS or n_rows <= SAMPLED_ROWS


def to_path(name: str) -> str:
    """HDF5 dataset path of a name: dots become slashes ('layers.0.attention.heads.3.q' ->
    '/layers/0/attention/heads/3/q')."""
    return "/" + name.replace(".", "/")


def from_path(path: str) -> str:
    return path.strip("/").replace("/", ".")
