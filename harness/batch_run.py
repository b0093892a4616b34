"""A batch traced (harness/batch.py): the implementation on the padded batch at once (`trace_batched`), and the truth,
the reference with its float64 oracle on each sequence alone, unpadded (`trace_truth`), both as `batch.{b}.NAME`.

The Hugging Face reference also runs batched (`--impl reference` with `--prompts`): transformers' `LlamaForCausalLM` on
the padded batch with its attention mask and positions counted from it, as `generate()` does, recorded at the names a
module returns (embeddings, each layer's norms, attention and feed-forward outputs, its output, norm, logits).
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import torch

from . import names as canon
from .errors import HarnessError
from .generation import decode_steps
from .implementation import Implementation, decoder
from .recording import record, scoped, step
from .run import Run, open_trace, trace_call
from .trace_file import Trace


def trace_batched(run: Run, impl: Implementation, out: str | Path) -> torch.Tensor:
    """`impl` on the padded batch at once: `forward(checkpoint, tokens [B, T], *, attention_mask [B, T], dtype,
    device)` -> logits [B, T, V]; every recorded [B, ...] tensor split into its sequences' real positions."""
    batch = run.batch
    if impl.name == "reference":
        impl = batched_reference()
    check_batched(impl)
    tokens, mask = batch.tokens(), batch.attention_mask()  # [B, T], [B, T]
    with open_trace(run, impl, out), scoped(split=batch.split()):
        record("tokens", tokens)
        return trace_call(run, impl.name, impl.forward, tokens, attention_mask=mask.to(run.device))


def trace_batched_generation(run: Run, impl: Implementation, out: str | Path, *, reference: Trace) -> torch.Tensor:
    """`--generate N` on the padded batch: the prefill [B, T], then N steps of one token [B, 1] per sequence, each
    sequence fed its own next token from `reference` (the truth's greedy ones: teacher-forced per sequence), the
    attention mask growing by a real column per step. Returns the prefill's logits [B, T, V]."""
    batch = run.batch
    if impl.name == "reference":
        raise HarnessError("--impl reference with --prompts and --generate: the batched reference runs one forward")
    check_batched(impl)
    fed = [_teacher_tokens(reference, b, ids, run.generate) for b, ids in enumerate(batch.sequences)]
    forward, cache = decoder(impl), {}  # the decode contract's cache: the same dict at every step
    tokens, all_logits = batch.tokens(), []  # [B, T]
    with open_trace(run, impl, out, generate=run.generate), scoped(split=batch.split(run.generate)):
        record("tokens", torch.cat([tokens, torch.tensor(fed, dtype=torch.long).view(batch.size, -1)], dim=1))
        for s in range(run.generate + 1):
            start_pos, n_tokens = canon.step_span(batch.width, s)
            step_ids = tokens if s == 0 else torch.tensor([[f[s - 1]] for f in fed], dtype=torch.long)  # [B, T]
            mask = batch.attention_mask(s).to(run.device)  # [B, K]: the prompt's columns and the s tokens decoded
            with step(s):
                logits = trace_call(
                    run,
                    impl.name,
                    forward,
                    step_ids,
                    step=s,
                    must_record=s == 0,
                    start_pos=start_pos,
                    cache=cache,
                    attention_mask=mask,
                )
            all_logits.append(logits)
    return all_logits[0]


def _teacher_tokens(reference: Trace, sequence: int, prompt: tuple[int, ...], n: int) -> list[int]:
    ids = reference[canon.batch_name(sequence, "tokens")].tolist()
    if tuple(ids[: len(prompt)]) != prompt or len(ids) != len(prompt) + n:
        raise HarnessError(f"{reference.path}: sequence {sequence}'s tokens are not its prompt plus {n} decoded ones")
    return ids[len(prompt) :]


def trace_truth(run: Run, impl: Implementation, out: str | Path) -> list[torch.Tensor]:
    """`impl` (the reference, with its oracle) on each sequence alone, unpadded, as `batch.{b}.NAME`: the truth each
    sequence of a batched run is judged against; with `run.generate`, each sequence's own greedy generation. Returns
    each sequence's logits [T_b, V] ([T_b + N, V] generating)."""
    logits = []
    with open_trace(run, impl, out, **({"generate": run.generate} if run.generate else {})):
        for b, ids in enumerate(run.batch.sequences):
            alone = dataclasses.replace(run, tokens=list(ids), batch=None)
            tokens = torch.tensor(ids, dtype=torch.long)  # [T_b]
            with scoped(sequence=b):
                if run.generate:
                    logits.append(decode_steps(alone, impl, None))
                    continue
                record("tokens", tokens)
                logits.append(trace_call(alone, impl.name, impl.forward, tokens))
    return logits


def check_batched(impl: Implementation) -> None:
    """A batched run needs the batched contract: an `attention_mask` keyword (or **kwargs)."""
    try:
        parameters = inspect.signature(impl.forward).parameters
    except (TypeError, ValueError):
        return
    if "attention_mask" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    raise HarnessError(
        f"{impl.name}: takes no attention_mask, so it cannot run a batch (--prompts): the batched contract is "
        f"forward(checkpoint, tokens [B, T], *, attention_mask [B, T], dtype, device) -> logits [B, T, V] "
        f"(docs/batches.md)"
    )


def batched_reference() -> Implementation:
    """Hugging Face's model on the padded batch (no oracle: the truth is each sequence alone)."""
    return Implementation("reference", _reference_forward, {"oracle": "none (batched)", "attention": "eager"})


def _reference_forward(checkpoint, tokens, *, attention_mask, dtype, device) -> torch.Tensor:
    from .reference import build_model  # transformers is imported only when the reference runs

    model = build_model(checkpoint, dtype, device)
    model.config._attn_implementation = "eager"  # HF's own attention, with its padding mask
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]: each sequence's own positions, as generate()
    hooks = [_hook(model.model.embed_tokens, "embeddings"), _hook(model.model.norm, "norm")]
    for layer, module in enumerate(model.model.layers):
        p = f"layers.{layer}."
        hooks += [
            _hook(module.input_layernorm, p + "attention_norm"),
            _hook(module.self_attn, p + "attention.output"),
            _hook(module.post_attention_layernorm, p + "ffn_norm"),
            _hook(module.mlp.gate_proj, p + "feed_forward.gate"),
            _hook(module.mlp.up_proj, p + "feed_forward.up"),
            _hook(module.mlp, p + "feed_forward.output"),
            _hook(module, p + "output"),
        ]
    try:
        out = model(tokens.to(device), attention_mask=attention_mask, position_ids=positions, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return out.logits  # [B, T, V]


def _hook(module: torch.nn.Module, name: str):
    def hook(mod, args, output) -> None:  # returns None: a forward hook's return value would replace the output
        record(name, output[0] if isinstance(output, tuple) else output)

    return module.register_forward_hook(hook)
