"""Generation: a prefill of the prompt, then decode steps of one token each, every step traced as `steps.{s}.NAME`.

Any implementation of the decode contract (harness/implementation.py) is traced the same way: the harness calls it once
per step, the step's tokens at positions start_pos .., and prefixes what it records with the step. The decoded tokens
are the reference's greedy ones (teacher forcing), so both sides always see the same inputs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import names as canon
from .errors import HarnessError
from .implementation import Implementation, decoder
from .names import ORACLE_PREFIX, RESERVED_PREFIX
from .recording import record, step, tracing
from .run import Run, open_trace, step_span, trace_call
from .trace_file import Trace, load_trace

GENERATED = RESERVED_PREFIX + "generated"  # each step's greedy token: a harness extra, never compared


def trace_generation(
    run: Run, impl: Implementation, out: str | Path, *, reference: Trace | None = None
) -> torch.Tensor:
    """Trace `run.generate` decode steps after the prefill into `out`; returns the logits of every position [P + N, V].

    Each step is one `trace_call` (harness/run.py) inside `harness.step(s)`. Decode step s feeds token s - 1 of
    `reference`'s generated ones (teacher forcing), or, without a reference, the implementation's own greedy choice.
    `tokens` holds every token fed, prompt and decoded [P + N]; `_generated` (an extra, not compared) each step's greedy
    token of this implementation, N + 1 of them.
    """
    fed = _teacher_tokens(run, reference)
    with open_trace(run, impl, out, generate=run.generate):
        return decode_steps(run, impl, fed)


def decode_steps(run: Run, impl: Implementation, fed: list[int] | None) -> torch.Tensor:
    """The prefill and `run.generate` decode steps of `impl` in the open trace, then `tokens` and `_generated`
    recorded; decode step s is fed `fed[s - 1]` (None: the implementation's own greedy token). -> logits [P + N, V]."""
    forward = decoder(impl)  # made for this generation: the implementation's own state lives in it and in `cache`
    cache: dict = {}  # the decode contract's: the implementation's KV cache, the same dict at every step
    all_logits, generated, tokens = [], [], list(run.tokens)
    for s in range(run.generate + 1):
        start_pos, n_tokens = step_span(run, s)
        step_ids = torch.tensor(tokens[start_pos : start_pos + n_tokens], dtype=torch.long)  # [T]
        with step(s):
            logits = trace_call(
                run, impl.name, forward, step_ids, step=s, must_record=s == 0, start_pos=start_pos, cache=cache
            )
        all_logits.append(logits.detach().float().cpu())
        generated.append(int(logits[-1].float().argmax()))
        if s < run.generate:
            tokens.append(fed[s] if fed is not None else generated[-1])
    record("tokens", torch.tensor(tokens, dtype=torch.long))
    record(GENERATED, torch.tensor(generated, dtype=torch.long))
    return torch.cat(all_logits)  # [P + N, V]


def _teacher_tokens(run: Run, reference: Trace | None) -> list[int] | None:
    """The decoded tokens `reference` generated after this run's prompt (None without a reference)."""
    if reference is None:
        return None
    n_prompt = len(run.tokens)
    fed = reference.tokens[n_prompt:]
    if reference.tokens[:n_prompt] != run.tokens or len(fed) != run.generate:
        raise HarnessError(f"{reference.path}: its tokens are not this run's prompt plus {run.generate} decoded ones")
    return fed


def generated_tokens(trace: Trace, sequence: int | None = None) -> list[int]:
    """Each step's greedy token of the implementation traced (N + 1 of them; empty for a trace without generation);
    of a batch's `sequence` run alone (`_generated.batch.{b}`)."""
    name = GENERATED if sequence is None else f"{GENERATED}.batch.{sequence}"
    return [int(t) for t in trace[name].tolist()] if name in trace else []


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
        reference = load_trace(reference_path) if reference_path is not None else None
        try:
            with load_trace(steps_path) as steps, load_trace(nocache_path) as nocache:
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
    for index in range(n_steps + 1):
        mine = [r for r in results if canon.split_step(r.name)[0] == index]
        failed = [r for r in mine if not r.passed]
        worst = max(mine, key=lambda r: r.ratio, default=None)
        summary.append(
            {
                "step": index,
                "names": len(mine),
                "passed": len(mine) - len(failed),
                "first_divergence": failed[0].name if failed else None,
                "worst": worst.name if worst else None,
                "worst_ratio": worst.ratio if worst else None,
            }
        )
    return summary


@dataclass(frozen=True)
class Tie:
    """Two greedy tokens `a` (the reference's) and `b` (the implementation's) at one row of logits: the float64
    oracle's margin between them (`gap`) against the two sides' largest logit errors there (`err`). Within the
    errors (`near`) a different choice is rounding, not a bug."""

    gap: float
    err: float

    @property
    def near(self) -> bool:
        return self.gap <= self.err


def greedy_tie(ref: torch.Tensor, impl: torch.Tensor, oracle: torch.Tensor, a: int, b: int) -> Tie:
    """The rule for a near tie, coded once: each side's logits row [V] and the oracle's, tokens `a` and `b`."""
    err = float((ref.double() - oracle.double()).abs().max() + (impl.double() - oracle.double()).abs().max())
    return Tie(gap=abs(float(oracle[a].double() - oracle[b].double())), err=err)


def unexplained_disagreements(reference_path: str | Path, impl_path: str | Path) -> list[str]:
    """Steps where the two sides' greedy tokens differ by more than their logits' measured error explains.

    At a near tie a bfloat16 run may pick the other token: that is rounding, not a bug, when the float64 oracle's
    logits of the two tokens lie within the two sides' largest logit errors of each other. Needs the oracle."""
    out = []
    with load_trace(reference_path) as ref, load_trace(impl_path) as impl:
        for step, (a, b) in enumerate(zip(generated_tokens(ref), generated_tokens(impl))):
            if a == b:
                continue
            name = canon.step_name(step, "logits")
            tie = greedy_tie(ref[name][-1], impl[name][-1], ref[ORACLE_PREFIX + name][-1], a, b)  # rows [V]
            if not tie.near:
                out.append(
                    f"step {step}: reference {a}, implementation {b}; the oracle puts them {tie.gap:.3g} apart, "
                    f"more than the logits' errors ({tie.err:.3g})"
                )
    return out
