"""The one run path: any implementation traced from a run's inputs (`trace`), parsed once by `make_run` (harness/run.py).

The Hugging Face reference, the scratch forward and a user's code are three implementations of one contract
(harness/implementation.py); this module gives each the same tokens, records the same metadata, checks the same shapes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .errors import HarnessError
from .implementation import Implementation, builtin
from .isolation import isolated
from .run import (  # noqa: F401  (re-exported: the names scripts import from harness.runner)
    DEFAULT_PROMPT,
    DTYPES,
    Run,
    check_device,
    decode_token,
    expected_shape,
    make_run,
    parse_dtype,
    prompt_tokens,
    read_prompt_file,
    step_span,
    token_text,
    trace_metadata,
)
from .tracing import Trace, record, record_calls, recorded, tracing


def trace(run: Run, impl: Implementation, out: str | Path, *, reference: Trace | None = None) -> torch.Tensor:
    """Trace `impl` on `run` into `out`; returns its logits [T, V]. The harness records `tokens` and the run's
    metadata, and `logits` from the return value unless the implementation recorded them. In isolated mode
    (`run.isolated`) every `harness.layer_input` call gets the input `reference` gave that layer.
    Nothing is written when the implementation fails, records nothing, or records or returns a wrong shape.
    With `run.generate` it traces a generation instead (harness/generation.py): a prefill and that many decode steps,
    fed the tokens of `reference` when given (teacher forcing), its own greedy tokens otherwise; returns the logits of
    every position [P + N, V]."""
    if run.generate:
        from .generation import trace_generation

        return trace_generation(run, impl, out, reference=reference)
    config = run.checkpoint.config
    tokens = torch.tensor(run.tokens, dtype=torch.long)  # [T]

    def check_shape(name: str, shape: tuple[int, ...]) -> str | None:
        want = expected_shape(run, name)
        if want is not None and shape != want:
            return f"{impl.name}: recorded {name!r} with shape {list(shape)}, expected {list(want)}"
        return None

    isolation = contextlib.nullcontext()
    if run.isolated:
        if reference is None:
            raise HarnessError("isolated mode needs the reference's trace")
        isolation = isolated(_reference_input(reference), config.n_layers, impl.name)
    meta = trace_metadata(run, impl.name, **impl.metadata)
    with tracing(out, names=run.names, check_shape=check_shape, **meta), torch.inference_mode():
        record("tokens", tokens)
        with isolation:
            logits = _call(impl, run, tokens)
        if record_calls() == 1:
            raise HarnessError(
                f"{impl.name}: recorded nothing: call harness.record(NAME, tensor) at the canonical names "
                f"(README: Canonical names), or map them in an Adapter"
            )
        if not recorded("logits"):
            record("logits", logits)
    return logits


def _call(impl: Implementation, run: Run, tokens: torch.Tensor) -> torch.Tensor:
    try:
        logits = impl.forward(run.checkpoint, tokens, dtype=run.torch_dtype, device=run.device)
    except (HarnessError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise HarnessError(f"{impl.name} raised {type(e).__name__}: {e} (rerun with --debug for the traceback)") from e
    want = (len(run.tokens), run.checkpoint.config.vocab_size)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != want:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise HarnessError(f"{impl.name}: returned logits {got}, expected a tensor of shape {list(want)} ([T, vocab])")
    return logits


def _reference_input(reference: Trace):
    """Isolated mode: `embeddings` into layer 0, `layers.{l-1}.output` into layer l (l = n_layers: the final norm)."""

    def layer_input(layer: int) -> torch.Tensor:
        return reference["embeddings"] if layer == 0 else reference[f"layers.{layer - 1}.output"]

    return layer_input


def trace_scratch(
    ckpt: Checkpoint,
    out: str | Path,
    *,
    prompt: str = DEFAULT_PROMPT,
    dtype: str = "float32",
    names: list[str] | None = None,
    device: str = "cpu",
    progress: bool = False,
    vectorized: bool = False,
) -> torch.Tensor:
    """The from-scratch forward traced into `out`; returns the logits [T, V]."""
    run = make_run(ckpt, prompt=prompt, dtype=dtype, device=device, names=names)
    return trace(run, builtin("scratch", vectorized=vectorized, progress=progress), out)


def trace_reference(
    ckpt: Checkpoint,
    out: str | Path,
    *,
    prompt: str = DEFAULT_PROMPT,
    dtype: str = "float32",
    names: list[str] | None = None,
    device: str = "cpu",
    oracle: bool = True,
) -> torch.Tensor:
    """The Hugging Face reference traced into `out` (with its float64 oracle under `_oracle.`); returns the logits."""
    run = make_run(ckpt, prompt=prompt, dtype=dtype, device=device, names=names)
    return trace(run, builtin("reference", oracle=oracle), out)
