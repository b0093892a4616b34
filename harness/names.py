"""The canonical names of a Llama-3 forward: their order, their axes. The one source of truth.

The scratch forward, the reference tracer, the comparator, the tests, the golden files and the report all read this.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

# Per query head h of layer l, in forward order.
HEAD_NAMES = ("q", "k", "v", "q_rotated", "k_rotated", "scores", "probs", "output")
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

# Axis names by the last part of a name; T = tokens. Stored as an attribute on every dataset.
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
    "scores": ("T", "T"),
    "probs": ("T", "T"),
    "head_output": ("T", "head_dim"),
}

_HEAD_RE = re.compile(r"^layers\.(\d+)\.attention\.heads\.(\d+)\.(\w+)$")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def layer_name(layer: int, part: str) -> str:
    return f"layers.{layer}.{part}"


def head_name(layer: int, head: int, part: str) -> str:
    return f"layers.{layer}.attention.heads.{head}.{part}"


def canonical_names(n_layers: int, n_heads: int) -> Iterator[str]:
    """Every canonical name of a model, in forward order (the order 'first divergence' uses)."""
    yield "tokens"
    yield "embeddings"
    for layer in range(n_layers):
        for part in LAYER_NAMES:
            if part == "heads":
                for head in range(n_heads):
                    for hpart in HEAD_NAMES:
                        yield head_name(layer, head, hpart)
            else:
                yield layer_name(layer, part)
    yield "norm"
    yield "logits"


def parse(name: str) -> tuple[int | None, int | None, str]:
    """'layers.3.attention.heads.7.q' -> (3, 7, 'q'); 'layers.3.ffn_norm' -> (3, None, 'ffn_norm'); 'norm' -> (None, None, 'norm')."""
    if m := _HEAD_RE.match(name):
        return int(m[1]), int(m[2]), m[3]
    if m := _LAYER_RE.match(name):
        return int(m[1]), None, m[2]
    return None, None, name


def order_key(name: str) -> tuple:
    """Sort key that puts any names, canonical or extra, in forward order."""
    layer, head, part = parse(name)
    if layer is None:
        top = {"tokens": 0, "embeddings": 1, "norm": 3, "logits": 4}.get(part, 5)
        return (top, 0, 0, 0, 0, part)
    if head is not None:
        idx = HEAD_NAMES.index(part) if part in HEAD_NAMES else len(HEAD_NAMES)
        return (2, layer, LAYER_NAMES.index("heads"), head, idx, part)
    idx = LAYER_NAMES.index(part) if part in LAYER_NAMES else len(LAYER_NAMES)
    return (2, layer, idx, 0, 0, part)


def axes(name: str) -> tuple[str, ...] | None:
    """Axis names of a canonical name (None for names we do not know)."""
    _, head, part = parse(name)
    if head is not None and part == "output":
        return _AXES["head_output"]
    return _AXES.get(part)


def to_path(name: str) -> str:
    """HDF5 dataset path of a name: dots become slashes ('layers.0.attention.heads.3.q' -> '/layers/0/attention/heads/3/q')."""
    return "/" + name.replace(".", "/")


def from_path(path: str) -> str:
    return path.strip("/").replace("/", ".")
