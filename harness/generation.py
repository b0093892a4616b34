"""Generation: a prefill of the prompt, then decode steps of one token each, every step traced as `steps.{s}.NAME`.

Any implementation of the decode contract (harness/implementation.py) is traced the same way: the harness calls it once
per step, the step's tokens at positions start_pos .., and prefixes what it records with the step. The decoded tokens
are the reference's greedy ones (teacher forcing), so both sides always see the same inputs.
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from . import names as canon
from .errors import HarnessError
from .implementation import Implementation, decoder
from .names import ORACLE_PREFIX, RESERVED_PREFIX
from .run import Run, expected_shape, step_span, trace_metadata
from .tracing import Trace, record, record_calls, recorded, tracing

_tracing = importlib.import_module(".tracing", __package__)  # the module (the package's `tracing` is its function)
GENERATED = RESERVED_PREFIX + "generated"  # each step's greedy token: a harness extra, never compared


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


def trace_generation(
    run: Run, impl: Implementation, out: str | Path, *, reference: Trace | None = None
) -> torch.Tensor:
    """Trace `run.generate` decode steps after the prefill into `out`; returns the logits of every position [P + N, V].

    Decode step s feeds token s - 1 of `reference`'s generated ones (teacher forcing), or, without a reference, the
    implementation's own greedy choice. `tokens` holds every token fed, prompt and decoded [P + N]; `_generated` (an
    extra, not compared) each step's greedy token of this implementation, N + 1 of them.
    """
    forward = decoder(impl)
    n_prompt = len(run.tokens)
    fed: list[int] | None = None
    if reference is not None:
        fed = reference.tokens[n_prompt:]
        if reference.tokens[:n_prompt] != run.tokens or len(fed) != run.generate:
            raise HarnessError(
                f"{reference.path}: its tokens are not this run's prompt plus {run.generate} decoded ones"
            )

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
                raise HarnessError(
                    f"{impl.name}: recorded nothing: call harness.record(NAME, tensor) at the canonical "
                    f"names (README: Canonical names), or map them in an Adapter"
                )
            all_logits.append(logits.detach().float().cpu())
            generated.append(int(logits[-1].float().argmax()))
            if step < run.generate:
                tokens.append(fed[step] if fed is not None else generated[-1])
        record("tokens", torch.tensor(tokens, dtype=torch.long))
        record(GENERATED, torch.tensor(generated, dtype=torch.long))
    return torch.cat(all_logits)  # [P + N, V]


def _call_step(
    impl: Implementation, forward, run: Run, tokens: torch.Tensor, start_pos: int, cache: dict, step: int
) -> torch.Tensor:
    try:
        logits = forward(
            run.checkpoint, tokens, dtype=run.torch_dtype, device=run.device, start_pos=start_pos, cache=cache
        )
    except (HarnessError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise HarnessError(
            f"{impl.name} raised {type(e).__name__} at step {step} (start_pos {start_pos}): {e} "
            f"(rerun with --debug for the traceback)"
        ) from e
    want = (len(tokens), run.checkpoint.config.vocab_size)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != want:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise HarnessError(
            f"{impl.name}: step {step} returned logits {got}, expected a tensor of shape {list(want)} "
            f"([T, vocab], T = the step's new tokens)"
        )
    return logits


def generated_tokens(trace: Trace) -> list[int]:
    """Each step's greedy token of the implementation traced (N + 1 of them; empty for a trace without generation)."""
    return [int(t) for t in trace[GENERATED].tolist()] if GENERATED in trace else []


# ---- cache against no cache ---------------------------------------------------------------------------------------


def _no_cache_slice(nocache: Trace, base: str, start_pos: int, n_tokens: int) -> tuple[str, torch.Tensor] | None:
    """What a no-cache forward over every token holds for a step's `base` name: its rows start_pos .. start_pos + T
    (and, for scores/probs, the columns up to K = start_pos + T); a head's cache_k/cache_v are its k_rotated/v rows
    up to K."""
    _, head, part = canon.parse(base)
    K = start_pos + n_tokens
    source = {"cache_k": "k_rotated", "cache_v": "v"}.get(part) if head is not None else None
    if source is not None:
        name = base[: -len(part)] + source
        return (name, nocache[name][:K]) if name in nocache else None
    if base not in nocache or base == "tokens":
        return None
    value = nocache[base][start_pos:K]
    return base, (value[:, :K] if head is not None and part in ("scores", "probs") else value)


def cache_vs_no_cache(
    run: Run, steps_path: str | Path, nocache_path: str | Path, reference_path: str | Path | None = None
) -> list:
    """Each step's names against the same implementation's no-cache forward over the prompt and the decoded tokens.

    The no-cache forward, cut into the steps' rows, is written as a reference-side trace and judged by compare itself:
    with `reference_path`'s float64 oracle (`_oracle.steps.{s}.NAME`) under the oracle rule, the no-cache run's own
    rounding as the floor (two correct runs of one implementation differ by their rounding, which at a one-row head
    output in float32 exceeded the fixed bound: 1.23e-5 against 1.02e-5); without an oracle, under compare's direct
    bound for the run's dtype. Returns compare's NameResults, named by the step's names, in forward order."""
    from .compare import compare_traces

    with tempfile.TemporaryDirectory(prefix="harness-cache-check-") as tmp:
        cut = Path(tmp) / "nocache-steps.h5"
        reference = _tracing.load_trace(reference_path) if reference_path is not None else None
        try:
            with _tracing.load_trace(steps_path) as steps, _tracing.load_trace(nocache_path) as nocache:
                meta = {k: v for k, v in steps.attrs.items() if k in ("dtype", "generate", "checkpoint")}
                with tracing(cut, **meta):
                    record("tokens", torch.tensor(steps.tokens))
                    for name in steps.names:
                        step, base = canon.split_step(name)
                        found = _no_cache_slice(nocache, base, *step_span(run, step)) if step is not None else None
                        if found is None:
                            continue
                        source, expected = found
                        if tuple(steps.shape(name)) != tuple(expected.shape):
                            raise HarnessError(
                                f"{name!r} has shape {list(steps.shape(name))}, the no-cache forward's "
                                f"{source!r} rows {list(expected.shape)}"
                            )
                        record(name, expected)
                        if reference is not None and ORACLE_PREFIX + name in reference:
                            record(ORACLE_PREFIX + name, reference[ORACLE_PREFIX + name])
        finally:
            if reference is not None:
                reference.close()
        return compare_traces(cut, steps_path).results


def step_summary(results: list, n_steps: int) -> list[dict[str, Any]]:
    """Per step: how many names compared, passed, the first divergence and the worst ratio."""
    summary = []
    for step in range(n_steps + 1):
        mine = [r for r in results if canon.split_step(r.name)[0] == step]
        failed = [r for r in mine if not r.passed]
        worst = max(mine, key=lambda r: r.ratio, default=None)
        summary.append(
            {
                "step": step,
                "names": len(mine),
                "passed": len(mine) - len(failed),
                "first_divergence": failed[0].name if failed else None,
                "worst": worst.name if worst else None,
                "worst_ratio": worst.ratio if worst else None,
            }
        )
    return summary


def unexplained_disagreements(reference_path: str | Path, impl_path: str | Path) -> list[str]:
    """Steps where the two sides' greedy tokens differ by more than their logits' measured error explains.

    At a near tie a bfloat16 run may pick the other token: that is rounding, not a bug, when the float64 oracle's
    logits of the two tokens lie within the two sides' largest logit errors of each other. Needs the oracle."""
    out = []
    with _tracing.load_trace(reference_path) as ref, _tracing.load_trace(impl_path) as impl:
        for step, (a, b) in enumerate(zip(generated_tokens(ref), generated_tokens(impl))):
            if a == b:
                continue
            name = canon.step_name(step, "logits")
            oracle = ref[ORACLE_PREFIX + name][-1].double()  # [V]
            err = float((ref[name][-1].double() - oracle).abs().max() + (impl[name][-1].double() - oracle).abs().max())
            gap = float(oracle[a] - oracle[b]).__abs__()
            if gap > err:
                out.append(
                    f"step {step}: reference {a}, implementation {b}; the oracle puts them {gap:.3g} apart, "
                    f"more than the logits' errors ({err:.3g})"
                )
    return out
