"""The canonical names of a Llama-3 forward: their order, their axes. The one source of truth.

The scratch forward, the reference tracer, the comparator, the tests, the golden files and the report all read this.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

# Per query head h of layer l, in forward order.
HEAD_NAMES = ("q", "k", "v", "q_rotated", "k_rotated", "scores", "probs", "output")
# Per query head, in a generation step only (`steps.{s}.`): the KV cache this head attends over after the step
# appended its keys and values, rotated keys [K, hd] and values [K, hd], K = start_pos + T positions so far.
CACHE_NAMES = ("cache_k", "cache_v")
# Where the cache names sit among the head names: after the step's own rotated keys, before the scores they feed.
_HEAD_ORDER = ("q", "k", "v", "q_rotated", "k_rotated", "cache_k", "cache_v", "scores", "probs", "output")
# Per layer, in forward order; "heads" marks where the per-head names sit.
LAYER_NAMES = (
    "attention_norm",
    "heads",
    "attention.output",
    "attention_residual",
    "ffn_norm",
    "feed_forward.gate",
    "feed_forward.up",
    "feed_forward.hidden",
    "feed_forward.output",
    "output",
)

# Axis names by the last part of a name; T = tokens, K = key positions (= T without a cache; start_pos + T in a
# generation step: every position the step attends to). Stored as an attribute on every dataset.
_AXES = {
    "tokens": ("T",),
    "embeddings": ("T", "dim"),
    "norm": ("T", "dim"),
    "logits": ("T", "vocab"),
    "attention_norm": ("T", "dim"),
    "attention.output": ("T", "dim"),
    "attention_residual": ("T", "dim"),
    "ffn_norm": ("T", "dim"),
    "feed_forward.gate": ("T", "ffn_dim"),
    "feed_forward.up": ("T", "ffn_dim"),
    "feed_forward.hidden": ("T", "ffn_dim"),
    "feed_forward.output": ("T", "dim"),
    "output": ("T", "dim"),
    "q": ("T", "head_dim"),
    "k": ("T", "head_dim"),
    "v": ("T", "head_dim"),
    "q_rotated": ("T", "head_dim"),
    "k_rotated": ("T", "head_dim"),
    "cache_k": ("K", "head_dim"),
    "cache_v": ("K", "head_dim"),
    "scores": ("T", "K"),
    "probs": ("T", "K"),
    "head_output": ("T", "head_dim"),
}

# Names whose first part starts with RESERVED_PREFIX are the harness's own extras, not trace names: the float64
# oracle's values of NAME are stored as ORACLE_PREFIX + NAME ("_oracle.layers.0.output").
RESERVED_PREFIX = "_"
ORACLE_PREFIX = RESERVED_PREFIX + "oracle."

_STEP_RE = re.compile(r"^steps\.(\d+)\.(.+)$")
_HEAD_RE = re.compile(r"^layers\.(\d+)\.attention\.heads\.(\d+)\.(\w+)$")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def layer_name(layer: int, part: str) -> str:
    return f"layers.{layer}.{part}"


def head_name(layer: int, head: int, part: str) -> str:
    return f"layers.{layer}.attention.heads.{head}.{part}"


def step_name(step: int, name: str) -> str:
    """A name in generation step `step` (0: the prefill of the prompt; s >= 1: decode step s, one new token)."""
    return f"steps.{step}.{name}"


def split_step(name: str) -> tuple[int | None, str]:
    """'steps.3.layers.0.q' -> (3, 'layers.0.q'); a name outside generation -> (None, name)."""
    if m := _STEP_RE.match(name):
        return int(m[1]), m[2]
    return None, name


def canonical_names(n_layers: int, n_heads: int, *, steps: int | None = None) -> Iterator[str]:
    """Every canonical name of a model, in forward order (the order 'first divergence' uses).

    With `steps` (a generation of `steps` decode steps after the prefill): `tokens`, then each step's names
    `steps.{s}.NAME`, s = 0 .. steps, step-major, the head names of a step including the cache's.
    """
    if steps is not None:
        yield "tokens"
        for step in range(steps + 1):
            yield from (step_name(step, n) for n in _names(n_layers, n_heads, cache=True) if n != "tokens")
        return
    yield from _names(n_layers, n_heads, cache=False)


def _names(n_layers: int, n_heads: int, cache: bool) -> Iterator[str]:
    yield "tokens"
    yield "embeddings"
    for layer in range(n_layers):
        for part in LAYER_NAMES:
            if part == "heads":
                for head in range(n_heads):
                    for hpart in _HEAD_ORDER if cache else HEAD_NAMES:
                        yield head_name(layer, head, hpart)
            else:
                yield layer_name(layer, part)
    yield "norm"
    yield "logits"


def parse(name: str) -> tuple[int | None, int | None, str]:
    """'layers.3.attention.heads.7.q' -> (3, 7, 'q'); 'layers.3.ffn_norm' -> (3, None, 'ffn_norm'); 'norm' -> (None, None, 'norm').

    A step's name parses as its base name ('steps.2.layers.3.ffn_norm' -> (3, None, 'ffn_norm')); `split_step` gives the step.
    """
    name = split_step(name)[1]
    if m := _HEAD_RE.match(name):
        return int(m[1]), int(m[2]), m[3]
    if m := _LAYER_RE.match(name):
        return int(m[1]), None, m[2]
    return None, None, name


def order_key(name: str) -> tuple:
    """Sort key that puts any names, canonical or extra, in forward order: generation steps step-major (every name of
    step s before any of step s + 1), after the names outside generation (`tokens`)."""
    step, base = split_step(name)
    step_key = -1 if step is None else step
    layer, head, part = parse(base)
    if layer is None:
        top = {"tokens": 0, "embeddings": 1, "norm": 3, "logits": 4}.get(part, 5)
        return (step_key, top, 0, 0, 0, 0, part)
    if head is not None:
        idx = _HEAD_ORDER.index(part) if part in _HEAD_ORDER else len(_HEAD_ORDER)
        return (step_key, 2, layer, LAYER_NAMES.index("heads"), head, idx, part)
    idx = LAYER_NAMES.index(part) if part in LAYER_NAMES else len(LAYER_NAMES)
    return (step_key, 2, layer, idx, 0, 0, part)


def axes(name: str) -> tuple[str, ...] | None:
    """Axis names of a canonical name (None for names we do not know). K (key positions) is T outside generation."""
    step, base = split_step(name)
    _, head, part = parse(base)
    found = _AXES["head_output"] if head is not None and part == "output" else _AXES.get(part)
    if found is not None and step is None:
        return tuple("T" if a == "K" else a for a in found)
    return found


def to_path(name: str) -> str:
    """HDF5 dataset path of a name: dots become slashes ('layers.0.attention.heads.3.q' -> '/layers/0/attention/heads/3/q')."""
    return "/" + name.replace(".", "/")


def from_path(path: str) -> str:
    return path.strip("/").replace("/", ".")
