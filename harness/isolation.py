"""Isolated mode and layer ranges: `x = harness.layer_input(layer, x)` hands a layer the reference's input to it, when a
run asks; `harness.skip_layer(layer)` says a layer of a `--layers A:B` run needs no computing.

Outside both it returns `x` unchanged at the cost of one context-variable lookup. Layer `n_layers` is the final norm.
A range run stops the forward at the first `layer_input` after its last layer (`RangeEnd`, caught by the harness).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from .errors import HarnessError

ReferenceInput = Callable[[int], torch.Tensor]  # layer -> the reference's input to that layer [T, D]


@dataclass(frozen=True)
class LayerRange:
    """`--layers A:B`: the decoder layers judged, `start` .. `stop - 1`, of a model of `n_layers` (with the embeddings
    when `start` is 0, the final norm and logits when `stop` is `n_layers`)."""

    start: int
    stop: int
    n_layers: int

    def judges(self, layer: int) -> bool:
        """Whether `layer` (`n_layers`: the final norm) is in the range."""
        return self.start <= layer < self.stop or layer == self.n_layers == self.stop

    def patterns(self) -> list[str]:
        """The names the range records, as `--names` globs."""
        ends = (["embeddings"] if self.start == 0 else []) + (["norm", "logits"] if self.stop == self.n_layers else [])
        return [f"layers.{layer}.*" for layer in range(self.start, self.stop)] + ends

    def __str__(self) -> str:
        return f"{self.start}:{self.stop}"


class RangeEnd(BaseException):
    """Raised by `layer_input` past a range's last layer: the rest of the forward is not needed. A BaseException, so
    that an implementation's own `except Exception` does not swallow it; `harness.run` catches it."""


@dataclass
class _Isolation:
    """An isolated run: where each layer's input comes from, and the layers that asked for it so far."""

    source: ReferenceInput
    used: set[int] = field(default_factory=set)


_isolation: ContextVar[_Isolation | None] = ContextVar("harness_isolation", default=None)
_range: ContextVar[LayerRange | None] = ContextVar("harness_layer_range", default=None)


def layer_input(layer: int, x: torch.Tensor) -> torch.Tensor:
    """The input of decoder layer `layer` (`n_layers`: the final norm): `x`, or in isolated mode the reference's.

    The reference's tensor takes `x`'s shape (a leading batch dimension of 1 is fine), dtype and device. In a
    `--layers A:B` run, a layer past the range (B, or the final norm when B < n_layers) ends the forward (`RangeEnd`).
    """
    if (judged := _range.get()) is not None and layer >= judged.stop and not judged.judges(layer):
        raise RangeEnd
    if (current := _isolation.get()) is None or judged is not None and not judged.judges(layer):
        return x
    reference = current.source(layer)
    if reference.numel() != x.numel():
        raise HarnessError(
            f"isolated mode: layer {layer}'s input has shape {list(x.shape)}, the reference's {list(reference.shape)}"
        )
    current.used.add(layer)
    return reference.reshape(x.shape).to(device=x.device, dtype=x.dtype)


def skip_layer(layer: int) -> bool:
    """True when this run needs nothing of decoder layer `layer`: an isolated `--layers A:B` run, the layer outside
    A..B-1. An implementation may then skip it (`if harness.skip_layer(layer): continue`): layer A's input comes from
    the reference through `layer_input`, and the forward ends at `layer_input(B, x)`. False in every other run."""
    judged = _range.get()
    return judged is not None and _isolation.get() is not None and not judged.judges(layer)


def layer_range() -> LayerRange | None:
    """The `--layers` range of the run in progress (None: every layer)."""
    return _range.get()


@contextmanager
def layers_judged(judged: LayerRange | None) -> Iterator[None]:
    """A `--layers` range for the block (None: nothing changes)."""
    token = _range.set(judged) if judged is not None else None
    try:
        yield
    finally:
        if token is not None:
            _range.reset(token)


@contextmanager
def isolated(source: ReferenceInput, n_layers: int, implementation: str) -> Iterator[None]:
    """Feed every `layer_input` call from `source`; the implementation must call it for every layer and the final
    norm (in a `--layers` range run, for the layers of the range)."""
    current = _Isolation(source)
    token = _isolation.set(current)
    try:
        yield
        judged = _range.get()
        wanted = [layer for layer in range(n_layers + 1) if judged is None or judged.judges(layer)]
        missing = sorted(set(wanted) - current.used)
        if missing:
            raise HarnessError(
                f"{implementation}: isolated mode, but harness.layer_input was never called for layer(s) "
                f"{_ranges(missing, n_layers)}: pass each layer's input through "
                f"`x = harness.layer_input(layer, x)` (and `harness.layer_input({n_layers}, x)` before the final norm)"
            )
    finally:
        _isolation.reset(token)


def _ranges(layers: list[int], n_layers: int) -> str:
    shown = ", ".join("final norm" if layer == n_layers else str(layer) for layer in layers[:8])
    return shown + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
