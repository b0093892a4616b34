"""A run's inputs, parsed once: `make_run` checks the checkpoint, prompt, dtype and device and loads the tokenizer
once, into a frozen `Run` that every implementation is traced from (harness/runner.py, harness/generation.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import names as canon
from .checkpoint import Checkpoint, open_checkpoint
from .errors import HarnessError
from .tokenizer import encode_prompt, load_tokenizer
from .tokenizer import token_text_of as _text

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


def prompt_tokens(ckpt: Checkpoint, prompt: str, enc=None) -> list[int]:
    """`[<|begin_of_text|>] + encode(prompt)`, checked against the checkpoint's vocabulary and context."""
    enc = enc or _tokenizer(ckpt)
    if enc.n_vocab > ckpt.config.vocab_size:
        raise HarnessError(
            f"{ckpt.tokenizer_path}: tokenizer has {enc.n_vocab} tokens, the model's vocab_size is {ckpt.config.vocab_size}"
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
    """`text(id)` for this checkpoint's tokenizer, loaded once; ids beyond the tokenizer (benchmark shapes) as <id N>."""
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
) -> Run:
    """Check every input before any work (errors come first) and load the tokenizer once."""
    parse_dtype(dtype)
    check_device(device)
    if not isinstance(generate, int) or generate < 0:
        raise HarnessError(f"--generate {generate}: expected a number of decode steps, 0 or more")
    if generate and isolated:
        raise HarnessError("--isolated with --generate: isolated mode covers one forward pass, not generation steps")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    enc = _tokenizer(ckpt)
    tokens = prompt_tokens(ckpt, prompt, enc)
    if len(tokens) + generate > ckpt.config.max_seq_len:
        raise HarnessError(
            f"{ckpt.path}: prompt of {len(tokens)} tokens plus --generate {generate} is longer than the "
            f"model's context of {ckpt.config.max_seq_len}"
        )
    return Run(ckpt, prompt, tokens, dtype, device, tuple(names) if names else None, isolated, _text(enc), generate)


def trace_metadata(run: Run, implementation: str, **extra: Any) -> dict[str, Any]:
    return dict(
        implementation=implementation,
        dtype=run.dtype,
        device=run.device,
        prompt=run.prompt,
        tokens=list(run.tokens),
        checkpoint=run.checkpoint,
        isolated=run.isolated,
        **extra,
    )


def step_span(run: Run, step: int) -> tuple[int, int]:
    """(start_pos, T) of a generation step: the prefill (0) covers the prompt, decode step s >= 1 one token."""
    n_prompt = len(run.tokens)
    return (0, n_prompt) if step == 0 else (n_prompt + step - 1, 1)


def expected_shape(run: Run, name: str) -> tuple[int, ...] | None:
    """The shape a canonical name must have in this run (None for names that are not canonical)."""
    c, n_tokens = run.checkpoint.config, len(run.tokens)
    step, _ = canon.split_step(name)
    if step is not None and step > run.generate:
        return None
    start_pos, n_tokens = (
        step_span(run, step) if step is not None else (0, n_tokens + (run.generate if name == "tokens" else 0))
    )
    sizes = {
        "T": n_tokens,
        "K": start_pos + n_tokens,
        "dim": c.dim,
        "vocab": c.vocab_size,
        "ffn_dim": c.ffn_dim,
        "head_dim": c.head_dim,
    }
    layer, head, part = canon.parse(name)
    axes = canon.axes(name)
    if axes is None or (layer is not None and layer >= c.n_layers) or (head is not None and head >= c.n_heads):
        return None
    return tuple(sizes[a] for a in axes)
