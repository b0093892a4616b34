"""Isolated mode: `x = harness.layer_input(layer, x)` hands a layer the reference's input to it, when a run asks.

Outside isolated mode it returns `x` unchanged at the cost of one context-variable lookup. Layer `n_layers` is the
final norm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from .errors import HarnessError

ReferenceInput = Callable[[int], torch.Tensor]  # layer -> the reference's input to that layer [T, D]


@dataclass
class _Isolation:
    """An isolated run: where each layer's input comes from, and the layers that asked for it so far."""

    source: ReferenceInput
    used: set[int] = field(default_factory=set)


_isolation: ContextVar[_Isolation | None] = ContextVar("harness_isolation", default=None)


def layer_input(layer: int, x: torch.Tensor) -> torch.Tensor:
    """The input of decoder layer `layer` (`n_layers`: the final norm): `x`, or in isolated mode the reference's.

    The reference's tensor takes `x`'s shape (a leading batch dimension of 1 is fine), dtype and device.
    """
    if (current := _isolation.get()) is None:
        return x
    reference = current.source(layer)
    if reference.numel() != x.numel():
        raise HarnessError(
            f"isolated mode: layer {layer}'s input has shape {list(x.shape)}, the reference's {list(reference.shape)}"
        )
    current.used.add(layer)
    return reference.reshape(x.shape).to(device=x.device, dtype=x.dtype)


@contextmanager
def isolated(source: ReferenceInput, n_layers: int, implementation: str) -> Iterator[None]:
    """Feed every `layer_input` call from `source`; the implementation must call it for every layer and the final
    norm."""
    current = _Isolation(source)
    token = _isolation.set(current)
    try:
        yield
        missing = sorted(set(range(n_layers + 1)) - current.used)
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
