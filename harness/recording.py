"""The recording API: `with tracing(path): ... record(name, tensor)`, and `with step(s):` for a generation step.

The open trace lives in a context variable, set by `tracing` and reset in `finally:`; outside it `record` is a no-op.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import names as canon
from .bound import UNIT_ROUNDOFF
from .errors import HarnessError
from .names import RESERVED_PREFIX
from .trace_file import Rows, ShapeCheck, TraceWriter, written


class _Recorder:
    """One open trace: which names it keeps (`patterns`), how many `record` calls it saw, the writer they go to."""

    def __init__(self, writer: TraceWriter, patterns: Sequence[str] | None, check_shape: ShapeCheck | None):
        self.writer = writer
        self.patterns = list(patterns) if patterns else None
        self.check_shape = check_shape
        self.calls = 0  # record() calls, kept or filtered out

    def wants(self, name: str) -> bool:
        if name == "tokens" or self.patterns is None or (name.startswith(RESERVED_PREFIX) and "." not in name):
            return True
        if canon.is_extra(name):
            name = name.split(".", 1)[1]  # an extra is filtered by the name it extends: "_oracle.norm" as "norm"
        name = canon.split_batch(name)[1]  # a batch's sequence's name by its own: "batch.1.norm" as "norm"
        if name == "tokens":
            return True
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def record(self, name: str, tensor: torch.Tensor | Rows) -> None:
        self.calls += 1
        if self.wants(name):
            self.writer.write(name, tensor, self.check_shape)


# A batched run's splitter (harness/batch.py): a recorded [B, ...] tensor -> each sequence's real positions, (b, [...]).
Split = Callable[[str, torch.Tensor, "int | None"], Iterator[tuple[int, torch.Tensor]]]


@dataclass(frozen=True)
class _Open:
    """What `record` sees: the open trace, the generation step its names go in (None: outside generation), the
    sequence of a batch run alone (`batch.{b}.`), or, for a batched run, how to split a tensor into its sequences."""

    recorder: _Recorder
    step: int | None = None
    sequence: int | None = None
    split: Split | None = None

    def name(self, name: str, sequence: int | None = None) -> str:
        """`name` in its scope: `batch.{b}.steps.{s}.NAME`; an extra `_oracle.NAME` as `_oracle.batch.{b}.steps...`."""
        if canon.is_extra(name):
            prefix, base = name.split(".", 1)
            return f"{prefix}.{self.name(base, sequence)}"
        sequence = self.sequence if sequence is None else sequence
        if name.startswith(RESERVED_PREFIX):  # a bare extra (`_generated`) of a sequence: `_generated.batch.{b}`
            return name if sequence is None else f"{name}.batch.{sequence}"
        name = name if self.step is None else canon.step_name(self.step, name)
        return name if sequence is None else canon.batch_name(sequence, name)

    def record(self, name: str, tensor: torch.Tensor | Rows) -> None:
        if self.split is None:
            self.recorder.record(self.name(name), tensor)
            return
        if isinstance(tensor, Rows):
            raise HarnessError(f"record({name!r}): a batched run records whole tensors [B, ...], not Rows")
        for sequence, part in self.split(name, tensor, self.step):
            self.recorder.record(self.name(name, sequence), part)


_open: ContextVar[_Open | None] = ContextVar("harness_open_trace", default=None)


def record(name: str, tensor: torch.Tensor | Rows) -> None:
    """Record `tensor` under the canonical `name` if a trace is open; costs one context-variable lookup otherwise.

    `tensor` may be `Rows`: the rows a trace keeps of a long [T, T] tensor computed by blocks, never held whole."""
    if (current := _open.get()) is not None:
        current.record(name, tensor)


def is_tracing() -> bool:
    return _open.get() is not None


def recorded(name: str) -> bool:
    """Whether the open trace holds `name` already (in the current step, inside `step`)."""
    current = _open.get()
    return current is not None and current.name(name, 0 if current.split else None) in current.recorder.writer


def record_calls() -> int:
    """How many times `record` was called in the open trace (names filtered out included)."""
    current = _open.get()
    return current.recorder.calls if current is not None else 0


def dtype_name(dtype: Any) -> str:
    """`tracing(dtype=...)`: torch.bfloat16 or "bfloat16" -> "bfloat16"; a dtype a trace cannot be computed in, or
    another spelling ("bf16"), is refused: `compare` reads the name to pick the rounding it allows."""
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    if not isinstance(name, str) or name not in UNIT_ROUNDOFF:
        raise HarnessError(
            f"harness.tracing(dtype={dtype!r}): expected {', '.join(UNIT_ROUNDOFF)} (a torch.dtype or its name)"
        )
    return name


@contextmanager
def tracing(
    path: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    check_shape: ShapeCheck | None = None,
    **metadata: Any,
) -> Iterator[None]:
    """Open a trace: every `record(...)` inside goes to the HDF5 file at `path`.

    `names` are glob patterns (e.g. "layers.0.*"); `tokens` is always kept. `metadata` becomes file attributes
    (`checkpoint=` an opened Checkpoint stamps its fingerprint, path and config, so `compare` can tell checkpoints
    apart; `dtype=` the working dtype, a torch.dtype or its name, stored as the name). `check_shape(name, shape)`
    returns an error message for a tensor of the wrong shape, or None.
    The file appears only when the block ends without error; an existing file is replaced atomically.
    """
    if _open.get() is not None:
        raise HarnessError("trace: tracing() is already active; traces cannot be nested")
    if "dtype" in metadata:
        metadata["dtype"] = dtype_name(metadata["dtype"])
    with written(path, metadata) as writer:
        token = _open.set(_Open(_Recorder(writer, names, check_shape)))
        try:
            yield
        finally:
            _open.reset(token)


@contextmanager
def step(index: int) -> Iterator[None]:
    """Generation step `index` (0: the prefill; s >= 1: decode step s): every `record(NAME, ...)` inside is recorded
    as `steps.{index}.NAME` (an extra `_oracle.NAME` as `_oracle.steps.{index}.NAME`). Outside a trace it does
    nothing; steps do not nest."""
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise HarnessError(f"harness.step({index!r}): expected a generation step, 0 or more")
    current = _open.get()
    if current is None:
        yield
        return
    if current.step is not None:
        raise HarnessError(f"harness.step({index}) inside harness.step({current.step}): generation steps do not nest")
    token = _open.set(replace(current, step=index))
    try:
        yield
    finally:
        _open.reset(token)


@contextmanager
def scoped(*, sequence: int | None = None, split: Split | None = None) -> Iterator[None]:
    """Inside the open trace: every name recorded as sequence `sequence` of a batch (`batch.{b}.NAME`: the reference's
    truth, each sequence run alone), or (`split`) each batched [B, ...] tensor split into its sequences' names."""
    current = _open.get()
    if current is None:
        raise HarnessError("recording.scoped: no trace is open")
    token = _open.set(replace(current, sequence=sequence, split=split))
    try:
        yield
    finally:
        _open.reset(token)
