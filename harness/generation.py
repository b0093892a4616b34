"""Generation: a prefill of the prompt, then decode steps of one token each, every step traced as `steps.{s}.NAME`.

Any implementation of the decode contract (harness/implementation.py) is traced the same way: the harness calls it once
per step, the step's tokens at positions start_pos .., and prefixes what it records with the step. The decoded tokens
are the reference's greedy ones (teacher forcing), so both sides always see the same inputs.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from . import names as canon
from .errors import HarnessError
from .implementation import Implementation, decoder
from .runner import Run, expected_shape, step_span, trace_metadata
from .tracing import RESERVED_PREFIX, Trace, record, record_calls, recorded, tracing

_tracing = importlib.import_module(".tracing", __package__)  # the module (the package's `tracing` is its function)


class _StepRecorder:
    """The open trace's recorder, with every name put in step `step` (`_oracle.NAME` as `_oracle.steps.{s}.NAME`)."""

    def __init__(self, inner: Any, step: int):
        self.inner, self.step = inner, step

    def record(self, name: str, tensor: torch.Tensor) -> None:
        self.inner.record(self._name(name), tensor)

    def _name(self, name: str) -> str:
        if name.startswith(RESERVED_PREFIX) and "." in name:
            prefix, base = name.split(".", 1)
            return f"{prefix}.{canon.step_name(self.step, base)}"
        return canon.step_name(self.step, name)

    def __getattr__(self, attr: str) -> Any:  # file, calls, ... of the trace itself
        return getattr(self.inner, attr)


@contextmanager
def in_step(step: int) -> Iterator[None]:
    """Every `harness.record(NAME, ...)` inside is recorded as `steps.{step}.NAME`; the implementation does not know."""
    inner = _tracing._active
    if inner is None:
        yield
        return
    _tracing._active = _StepRecorder(inner, step)
    try:
        yield
    finally:
        _tracing._active = inner


def step_tokens(run: Run, fed: list[int]) -> list[list[int]]:
    """The tokens of each step: the prompt, then one decoded token per step."""
    return [run.tokens] + [[t] for t in fed]


def trace_generation(run: Run, impl: Implementation, out: str | Path, *, reference: Trace | None = None) -> torch.Tensor:
    """Trace `run.generate` decode steps after the prefill into `out`; returns the logits of every position [P + N, V].

    Decode step s feeds token s - 1 of `reference`'s generated ones (teacher forcing), or, without a reference, the
    implementation's own greedy choice. `tokens` holds every token fed, prompt and decoded [P + N]; `generated` (an
    attribute) each step's greedy token of this implementation, N + 1 of them.
    """
    forward = decoder(impl)
    n_prompt = len(run.tokens)
    fed: list[int] | None = None
    if reference is not None:
        fed = reference.tokens[n_prompt:]
        if reference.tokens[:n_prompt] != run.tokens or len(fed) != run.generate:
            raise HarnessError(f"{reference.path}: its tokens are not this run's prompt plus {run.generate} decoded ones")

    def check_shape(name: str, shape: tuple[int, ...]) -> str | None:
        want = expected_shape(run, name)
        if want is not None and shape != want:
            return f"{impl.name}: recorded {name!r} with shape {list(shape)}, expected {list(want)}"
        return None

    cache: dict = {}
    all_logits, generated, tokens = [], [], list(run.tokens)
    meta = trace_metadata(run, impl.name, generate=run.generate, **impl.metadata)
    with tracing(out, names=run.names, check_shape=check_shape, **meta), torch.inference_mode():
        for step in range(run.generate + 1):
            start_pos, n_tokens = step_span(run, step)
            step_ids = torch.tensor(tokens[start_pos : start_pos + n_tokens], dtype=torch.long)  # [T]
            calls = record_calls()
            with in_step(step):
                logits = _call_step(impl, forward, run, step_ids, start_pos, cache, step)
                if not recorded(canon.step_name(step, "logits")):
                    record("logits", logits)
            if step == 0 and record_calls() == calls + 1:
                raise HarnessError(f"{impl.name}: recorded nothing: call harness.record(NAME, tensor) at the canonical "
                                   f"names (README: Canonical names), or map them in an Adapter")  # fmt: skip
            all_logits.append(logits.detach().float().cpu())
            generated.append(int(logits[-1].float().argmax()))
            if step < run.generate:
                tokens.append(fed[step] if fed is not None else generated[-1])
        record("tokens", torch.tensor(tokens, dtype=torch.long))
        _tracing._active.file.attrs["generated"] = str(generated)
    return torch.cat(all_logits)  # [P + N, V]


def _call_step(impl: Implementation, forward, run: Run, tokens: torch.Tensor, start_pos: int, cache: dict,
               step: int) -> torch.Tensor:
    try:
        logits = forward(run.checkpoint, tokens, dtype=run.torch_dtype, device=run.device, start_pos=start_pos, cache=cache)
    except (HarnessError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise HarnessError(f"{impl.name} raised {type(e).__name__} at step {step} (start_pos {start_pos}): {e} "
                           f"(rerun with --debug for the traceback)") from e  # fmt: skip
    want = (len(tokens), run.checkpoint.config.vocab_size)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != want:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise HarnessError(f"{impl.name}: step {step} returned logits {got}, expected a tensor of shape {list(want)} "
                           f"([T, vocab], T = the step's new tokens)")  # fmt: skip
    return logits


def generated_tokens(trace: Trace) -> list[int]:
    """Each step's greedy token of the implementation traced (N + 1 of them; empty for a trace without generation)."""
    return [int(t) for t in trace.attrs.get("generated", [])]
