"""Run an implementation on a checkpoint and a prompt into a trace file, with the metadata every trace carries."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint
from .errors import HarnessError
from .tokenizer import encode_prompt, load_tokenizer
from .tracing import tracing

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
        raise HarnessError(f"device {name!r}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise HarnessError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def prompt_tokens(ckpt: Checkpoint, prompt: str) -> list[int]:
    """`[<|begin_of_text|>] + encode(prompt)`, checked against the checkpoint's vocabulary and context."""
    if ckpt.tokenizer_path is None:
        raise HarnessError(f"{ckpt.path}: no tokenizer.model (or tokenizer.json) in the checkpoint directory")
    enc = load_tokenizer(ckpt.tokenizer_path)
    if enc.n_vocab > ckpt.config.vocab_size:
        raise HarnessError(f"{ckpt.tokenizer_path}: tokenizer has {enc.n_vocab} tokens, the model's vocab_size is {ckpt.config.vocab_size}")
    tokens = encode_prompt(enc, prompt)
    if len(tokens) > ckpt.config.max_seq_len:
        source = "params.json max_seq_len" if ckpt.format == "meta" else "config.json max_position_embeddings"
        raise HarnessError(f"{ckpt.path}: prompt is {len(tokens)} tokens, longer than the model's context of "
                           f"{ckpt.config.max_seq_len} ({source}); use a shorter --prompt")  # fmt: skip
    return tokens


def token_text(ckpt: Checkpoint) -> Callable[[int], str]:
    """`text(id)` for this checkpoint's tokenizer, loaded once; ids beyond the tokenizer (benchmark shapes) as <id N>."""
    enc = load_tokenizer(ckpt.tokenizer_path)

    def text(token: int) -> str:
        if not 0 <= token < enc.n_vocab:
            return f"<id {token}>"
        return enc.decode_single_token_bytes(token).decode("utf-8", errors="replace")

    return text


def decode_token(ckpt: Checkpoint, token: int) -> str:
    return token_text(ckpt)(token)


def trace_metadata(ckpt: Checkpoint, *, implementation: str, dtype: str, tokens: list[int], prompt: str,
                   device: str = "cpu", **extra: Any) -> dict[str, Any]:
    config = ckpt.config
    return dict(
        implementation=implementation, dtype=dtype, device=device, prompt=prompt, tokens=json.dumps(tokens),
        checkpoint=ckpt.fingerprint(), checkpoint_path=str(ckpt.path), checkpoint_format=ckpt.format,
        config=json.dumps(config.to_dict()), n_layers=config.n_layers, n_heads=config.n_heads,
        rope_theta=config.rope_theta, rope_scaling_factor=config.rope_scaling_factor or 0.0, **extra,
    )  # fmt: skip


def trace_scratch(ckpt: Checkpoint, out: str | Path, *, prompt: str = DEFAULT_PROMPT, dtype: str = "float32",
                  names: list[str] | None = None, device: str = "cpu", progress: bool = False,
                  layer_input=None, vectorized: bool = False, **extra: Any) -> torch.Tensor:
    """The from-scratch forward traced into `out`; returns the logits [T, V]."""
    from . import scratch

    torch_dtype = parse_dtype(dtype)
    tokens = prompt_tokens(ckpt, prompt)
    meta = trace_metadata(ckpt, implementation="scratch", dtype=dtype, tokens=tokens, prompt=prompt, device=device,
                          attention="all heads at once" if vectorized else "one head at a time", **extra)  # fmt: skip
    with tracing(out, names=names, **meta), torch.inference_mode():
        return scratch.forward(ckpt, tokens, dtype=torch_dtype, device=device, progress=progress, layer_input=layer_input,
                               vectorized=vectorized)


def trace_implementation(impl: str, ckpt: Checkpoint, out: str | Path, **options: Any) -> torch.Tensor:
    """`--impl scratch` or `--impl reference` into a trace file; returns the logits [T, V]."""
    check_device(options.get("device", "cpu"))
    if impl == "scratch":
        return trace_scratch(ckpt, out, **options)
    if impl == "reference":
        from .reference import trace_reference

        return trace_reference(ckpt, out, **options)
    raise HarnessError(f"unknown implementation {impl!r}; choose scratch or reference")
