"""The one run path: a run's inputs parsed once (`make_run` -> a frozen `Run`), and any implementation of the contract
traced from it (`trace`), one call at a time (`trace_call`: generation, harness/generation.py, loops over it).

The Hugging Face reference, the scratch forward and a user's code are three implementations of one contract
(harness/implementation.py): each gets the same tokens, records the same metadata, is held to the same shapes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import names as canon
from .batch import PADDINGS, Batch
from .checkpoint import Checkpoint, open_checkpoint
from .errors import HarnessError
from .gguf_weights import GGUFCheckpoint, open_gguf_weights
from .implementation import Forward, Implementation, builtin
from .isolation import LayerRange, RangeEnd, isolated, layers_judged
from .recording import record, record_calls, recorded, tracing
from .tokenizer import encode_prompt, load_tokenizer
from .tokenizer import token_text_of as _text
from .trace_file import Trace

DEFAULT_PROMPT = "the answer to the ultimate question of life, the universe, and everything is "
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise HarnessError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_device(name: str) -> torch.device:
    """`--device`: a torch device string this machine has (checked before any work, so the error comes first)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HarnessError(f"unknown device {name!r}; use e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(
            f"device {name!r}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise HarnessError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def read_prompt_file(path: str | Path) -> str:
    """`--prompt-file`: the file's text exactly as it is (UTF-8; a final newline is part of the prompt)."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: prompt file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HarnessError(f"{path}: prompt file is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise HarnessError(f"{path}: cannot read prompt file ({e.strerror})") from None


def _tokenizer(ckpt: Checkpoint):
    if ckpt.tokenizer_path is None:
        raise HarnessError(f"{ckpt.path}: no tokenizer.model (or tokenizer.json) in the checkpoint directory")
    return load_tokenizer(ckpt.tokenizer_path)


def prompt_tokens(ckpt: Checkpoint | str | Path, prompt: str = DEFAULT_PROMPT, enc=None) -> list[int]:
    """`[<|begin_of_text|>] + encode(prompt)` with the tokenizer of `ckpt` (a Checkpoint or its directory), checked
    against the checkpoint's vocabulary and context: the tokens `verify` and `trace` run (`harness.prompt_tokens`)."""
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else open_checkpoint(ckpt)
    enc = enc or _tokenizer(ckpt)
    if enc.n_vocab > ckpt.config.vocab_size:
        raise HarnessError(
            f"{ckpt.tokenizer_path}: tokenizer has {enc.n_vocab} tokens, the model's vocab_size is "
            f"{ckpt.config.vocab_size}"
        )
    tokens = encode_prompt(enc, prompt)
    if len(tokens) > ckpt.config.max_seq_len:
        source = (
            "params.json max_seq_len, or without it 8192, 131072 with Llama 3.1 RoPE scaling"
            if ckpt.format == "meta"
            else "config.json max_position_embeddings, or without it 8192"
        )
        raise HarnessError(
            f"{ckpt.path}: prompt is {len(tokens)} tokens, longer than the model's context of "
            f"{ckpt.config.max_seq_len} ({source}); use a shorter prompt"
        )
    return tokens


def token_text(ckpt: Checkpoint) -> Callable[[int], str]:
    """`text(id)` for this checkpoint's tokenizer, loaded once; ids beyond the tokenizer (benchmark shapes) as
    <id N>."""
    return _text(load_tokenizer(ckpt.tokenizer_path))


def decode_token(ckpt: Checkpoint, token: int) -> str:
    return token_text(ckpt)(token)


@dataclass(frozen=True)
class Run:
    """A run's inputs, parsed once: the checkpoint, the prompt's tokens, dtype, device, name filters, isolated or not.

    Every implementation (the reference, the scratch forward, a user's) is traced from one of these.
    """

    checkpoint: Checkpoint
    prompt: str
    tokens: list[int]
    dtype: str
    device: str = "cpu"
    names: tuple[str, ...] | None = None
    isolated: bool = False
    text: Callable[[int], str] = repr  # token id -> text, from the tokenizer loaded once for the run
    generate: int = 0  # decode steps after the prefill (harness/generation.py); 0: one forward over the prompt
    layers: LayerRange | None = None  # --layers A:B: only those decoder layers recorded (and, isolated, judged)
    batch: Batch | None = None  # --prompts: every sequence (`tokens` is the first's), padded (harness/batch.py)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def make_run(
    checkpoint: Checkpoint | str | Path,
    *,
    prompt: str = DEFAULT_PROMPT,
    dtype: str = "float32",
    device: str = "cpu",
    names: Sequence[str] | None = None,
    isolated: bool = False,
    generate: int = 0,
    layers: str | tuple[int, int] | None = None,
    prompts: Sequence[str] | None = None,
    padding: str = "left",
    weights_from: str | Path | None = None,
) -> Run:
    """Check every input before any work (errors come first) and load the tokenizer once. `layers`: "A:B" or (A, B).
    `prompts` (`--prompts`): a batch of them, padded on the `padding` side (harness/batch.py); `prompt` is unused."""
    parse_dtype(dtype)
    check_device(device)
    if not isinstance(generate, int) or generate < 0:
        raise HarnessError(f"--generate {generate}: expected a number of decode steps, 0 or more")
    if generate and layers is not None:
        raise HarnessError("--layers with --generate: a layer range covers one forward pass, not generation steps")
    if generate and isolated:
        raise HarnessError("--isolated with --generate: isolated mode covers one forward pass, not generation steps")
    if layers is not None and names:
        raise HarnessError("--layers with --names: a range records its layers' names; give one of the two")
    if prompts is not None and (isolated or layers is not None):
        raise HarnessError("--prompts with --isolated or --layers: a batch is judged end to end; run them without it")
    if padding not in PADDINGS:
        raise HarnessError(f"--padding {padding}: expected left or right")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    if weights_from is not None:  # --weights-from MODEL.gguf: every side on its dequantized weights (docs/quantized.md)
        ckpt = open_gguf_weights(weights_from, ckpt)
    judged = None if layers is None else parse_layers(layers, ckpt.config.n_layers)
    enc = _tokenizer(ckpt)
    batch = None
    if prompts is not None:
        if not prompts:
            raise HarnessError("--prompts: no prompts given")
        sequences = tuple(tuple(prompt_tokens(ckpt, p, enc)) for p in prompts)
        batch = Batch(sequences, padding, pad_id=enc.encode_single_token("<|end_of_text|>"))
        prompt = prompts[0]
    tokens = list(batch.sequences[0]) if batch else prompt_tokens(ckpt, prompt, enc)
    longest = batch.width if batch else len(tokens)
    if longest + generate > ckpt.config.max_seq_len:
        raise HarnessError(
            f"{ckpt.path}: prompt of {longest} tokens plus --generate {generate} is longer than the "
            f"model's context of {ckpt.config.max_seq_len}"
        )
    names = tuple(names) if names else None
    return Run(ckpt, prompt, tokens, dtype, device, names, isolated, _text(enc), generate, judged, batch)


def parse_layers(layers: str | tuple[int, int], n_layers: int) -> LayerRange:
    """`--layers A:B` (or (A, B)): decoder layers A .. B - 1 of a model of `n_layers`, 0 <= A < B <= n_layers."""
    text = layers if isinstance(layers, str) else ":".join(map(str, layers))
    start, _, stop = text.partition(":")
    if not (start.isdigit() and stop.isdigit()):
        raise HarnessError(f"--layers {text}: expected A:B, the decoder layers A .. B-1 (e.g. 0:{n_layers}: all)")
    if not int(start) < int(stop) <= n_layers:
        raise HarnessError(
            f"--layers {text}: outside the model's {n_layers} layers; A:B with 0 <= A < B <= {n_layers} "
            f"(0:{n_layers}: all of them)"
        )
    return LayerRange(int(start), int(stop), n_layers)


def trace_metadata(run: Run, implementation: str, **extra: Any) -> dict[str, Any]:
    return dict(
        implementation=implementation,
        dtype=run.dtype,
        device=run.device,
        prompt=run.prompt,
        tokens=list(run.tokens),
        checkpoint=run.checkpoint,
        isolated=run.isolated,
        **({"layers": [run.layers.start, run.layers.stop]} if run.layers else {}),
        **(_batch_metadata(run.batch) if run.batch else {}),
        **(run.checkpoint.metadata() if isinstance(run.checkpoint, GGUFCheckpoint) else {}),
        **extra,
    )


def _batch_metadata(batch: Batch) -> dict[str, Any]:
    return dict(batch=json.dumps([list(ids) for ids in batch.sequences]), padding=batch.padding, pad_id=batch.pad_id)


def step_span(run: Run, step: int) -> tuple[int, int]:
    """(start_pos, T) of a generation step: the prefill (0) covers the prompt, decode step s >= 1 one token."""
    return canon.step_span(len(run.tokens), step)


def expected_shape(run: Run, name: str) -> tuple[int, ...] | None:
    """The shape a canonical name must have in this run (None for names that are not canonical)."""
    sequence, unbatched = canon.split_batch(name)
    step, base = canon.split_step(name)
    if step is not None and step > run.generate or (sequence is not None) != (run.batch is not None):
        return None
    if sequence is not None and sequence >= run.batch.size:
        return None
    prompt = run.batch.sequences[sequence] if sequence is not None else run.tokens
    n_tokens = len(prompt) + (run.generate if base == "tokens" else 0)
    start_pos, n_tokens = canon.step_span(len(prompt), step) if step is not None else (0, n_tokens)
    return canon.shape_of(unbatched, run.checkpoint.config, n_tokens, start_pos) if base != "tokens" else (n_tokens,)


# ---- tracing a run ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def open_trace(run: Run, impl: Implementation, out: str | Path, **extra: Any) -> Iterator[None]:
    """The trace of `impl` on `run` at `out`: the run's metadata (and `extra`), its name filters, its shapes checked."""

    def check_shape(name: str, shape: tuple[int, ...]) -> str | None:
        want = expected_shape(run, name)
        if want is not None and shape != want:
            return f"{impl.name}: recorded {name!r} with shape {list(shape)}, expected {list(want)}"
        return None

    meta = trace_metadata(run, impl.name, **extra, **impl.metadata)
    with tracing(out, names=_kept(run, impl), check_shape=check_shape, **meta), torch.inference_mode():
        yield


def _kept(run: Run, impl: Implementation) -> tuple[str, ...] | None:
    """The name globs a trace keeps: the run's (`--names`), or its range's names. The reference, run whole up to the
    range, also keeps its output of the layer before it: the input isolated mode gives the range's first layer."""
    if run.layers is None:
        return run.names
    patterns = run.layers.patterns()
    if impl.name == "reference" and not run.isolated and run.layers.start > 0:
        patterns.append(f"layers.{run.layers.start - 1}.output")
    return tuple(patterns)


def trace(run: Run, impl: Implementation, out: str | Path, *, reference: Trace | None = None) -> torch.Tensor | None:
    """Trace `impl` on `run` into `out`; returns its logits [T, V]. The harness records `tokens` and the run's
    metadata, and `logits` from the return value unless the implementation recorded them. In isolated mode
    (`run.isolated`) every `harness.layer_input` call gets the input `reference` gave that layer.
    A `--layers A:B` run (`run.layers`) keeps only the range's names and ends the forward at `layer_input(B, x)`:
    None when that is before the logits.
    Nothing is written when the implementation fails, records nothing, or records or returns a wrong shape.
    A generation (`run.generate`) is harness/generation.py's `trace_generation`."""
    if run.generate:
        raise HarnessError(f"trace: run.generate is {run.generate}: harness.generation.trace_generation traces it")
    if run.batch is not None:
        raise HarnessError("trace: run.batch is a padded batch: harness.batch_run.trace_batched traces it")
    isolation = None
    if run.isolated:
        if reference is None:
            raise HarnessError("isolated mode needs the reference's trace")
        isolation = isolated(_reference_input(reference), run.checkpoint.config.n_layers, impl.name)
    tokens = torch.tensor(run.tokens, dtype=torch.long)  # [T]
    with open_trace(run, impl, out), layers_judged(run.layers):
        record("tokens", tokens)
        return trace_call(run, impl.name, impl.forward, tokens, isolation=isolation)


def trace_call(
    run: Run,
    name: str,
    forward: Forward,
    tokens: torch.Tensor,
    *,
    step: int | None = None,
    isolation: contextlib.AbstractContextManager | None = None,
    must_record: bool = True,
    **decode: Any,
) -> torch.Tensor:
    """One call of an implementation inside the open trace, on the whole prompt or (`step`, with the decode contract's
    `start_pos` and `cache`) on one generation step's new tokens: its logits [T, V] checked and recorded as `logits`
    unless it recorded them. With `must_record`, a call that records nothing is refused."""
    calls = record_calls()
    with isolation or contextlib.nullcontext():
        logits = _call(run, name, forward, tokens, step, **decode)
    if must_record and record_calls() == calls:
        raise HarnessError(
            f"{name}: recorded nothing: call harness.record(NAME, tensor) at the canonical names "
            f"(README: Canonical names), or map them in an Adapter"
        )
    if logits is not None and not recorded("logits"):
        record("logits", logits)
    return logits


def _call(run: Run, name: str, forward: Forward, tokens: torch.Tensor, step: int | None, **decode) -> torch.Tensor:
    """The implementation called, its errors as one line naming it (and the step), its logits' shape checked. None:
    a `--layers` range ended the forward before the logits."""
    try:
        logits = forward(run.checkpoint, tokens, dtype=run.torch_dtype, device=run.device, **decode)
    except RangeEnd:
        return None
    except (HarnessError, KeyboardInterrupt):
        raise
    except Exception as e:
        where = "" if step is None else f" at step {step} (start_pos {decode['start_pos']})"
        raise HarnessError(
            f"{name} raised {type(e).__name__}{where}: {e} (rerun with --debug for the traceback)"
        ) from e
    want = (*tokens.shape, run.checkpoint.config.vocab_size)  # [T, V], or [B, T, V] for a batch
    if logits is None and run.layers is not None and run.layers.stop < run.layers.n_layers:
        return None  # the range ended before the logits (the implementation's own way of stopping)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != want:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        what, axes = ("", "[T, vocab]") if step is None else (f" step {step}", "[T, vocab], T = the step's new tokens")
        axes = axes.replace("[T", "[B, T") if tokens.dim() == 2 else axes
        raise HarnessError(f"{name}:{what} returned logits {got}, expected a tensor of shape {list(want)} ({axes})")
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
    layers: str | tuple[int, int] | None = None,
) -> torch.Tensor | None:
    """The from-scratch forward traced into `out`; returns the logits [T, V] (None: a `layers` range ended first)."""
    run = make_run(ckpt, prompt=prompt, dtype=dtype, device=device, names=names, layers=layers)
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
    layers: str | tuple[int, int] | None = None,
) -> torch.Tensor | None:
    """The Hugging Face reference traced into `out` (with its float64 oracle under `_oracle.`); returns the logits."""
    run = make_run(ckpt, prompt=prompt, dtype=dtype, device=device, names=names, layers=layers)
    return trace(run, builtin("reference", oracle=oracle), out)
