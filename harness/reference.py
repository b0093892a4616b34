"""The Hugging Face reference: transformers' own `LlamaForCausalLM` on the same weights, traced at the canonical names.

What modules return is taken by forward hooks; what no module returns (rotated q/k, scores, probs, per-head outputs)
by an attention function registered through transformers' public AttentionInterface. Every tensor is mapped to the
scratch layout: batch dropped, heads split, q/k back to Meta's interleaved pairs, each query head given its KV head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask, eager_mask
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    eager_attention_forward,
    repeat_kv,
)

from . import hf_layout
from .checkpoint import Checkpoint
from .config import ModelConfig
from .names import head_name, layer_name
from .runner import DEFAULT_PROMPT, parse_dtype, prompt_tokens, trace_metadata
from .tracing import record, tracing

ATTENTION = "harness_traced"  # HF's eager attention, with its intermediates recorded
ORACLE_PREFIX = "_oracle."

Emit = Callable[[str, torch.Tensor], None]
_emit: Emit | None = None  # where the traced attention function sends its tensors during a traced run


def kv_head(head: int, n_rep: int) -> int:
    """Grouped-query attention: query head h reads KV head h // n_rep (repeat_kv's order)."""
    return head // n_rep


def _attention_float64(module, query, key, value, attention_mask, scaling):
    """Eager attention with the softmax in float64: eager's float32 softmax would cap the oracle at float32 precision."""
    n_rep = module.num_key_value_groups
    scores = torch.matmul(query, repeat_kv(key, n_rep).transpose(2, 3)) * scaling + attention_mask  # [1, H, T, T]
    probs = torch.softmax(scores, dim=-1)  # [1, H, T, T]
    return torch.matmul(probs, repeat_kv(value, n_rep)).transpose(1, 2).contiguous(), probs  # [1, T, H, hd]


def _traced_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """HF's eager attention, unchanged (in float64: without its float32 softmax); q/k after RoPE, scores before the
    mask, probs and per-head outputs recorded.

    query [1, H, T, hd] and key/value [1, KV, T, hd] (before repeat_kv), in HF's half-split q/k order.
    """
    if query.dtype == torch.float64:
        attn_output, probs = _attention_float64(module, query, key, value, attention_mask, scaling)
    else:
        attn_output, probs = eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if _emit is not None:
        n_rep = module.num_key_value_groups
        scores = torch.matmul(query, repeat_kv(key, n_rep).transpose(2, 3)) * scaling  # [1, H, T, T], as eager does
        layer = module.layer_idx
        for head in range(query.shape[1]):
            kv = kv_head(head, n_rep)
            _emit(head_name(layer, head, "q_rotated"), hf_layout.half_split_to_interleaved(query[0, head]))
            _emit(head_name(layer, head, "k_rotated"), hf_layout.half_split_to_interleaved(key[0, kv]))
            _emit(head_name(layer, head, "scores"), scores[0, head])
            _emit(head_name(layer, head, "probs"), probs[0, head])
            _emit(head_name(layer, head, "output"), attn_output[0, :, head])  # attn_output is [1, T, H, hd]
    return attn_output, probs


AttentionInterface.register(ATTENTION, _traced_attention)
AttentionMaskInterface.register(ATTENTION, eager_mask)  # the mask eager attention gets: finfo.min above the diagonal


def hf_config(config: ModelConfig) -> LlamaConfig:
    """The transformers LlamaConfig of a harness config (Meta's FFN width, llama3 rope scaling, tied embeddings)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if s := config.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position_embeddings}  # fmt: skip
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.norm_eps, max_position_embeddings=config.max_seq_len,
        rope_parameters=rope, tie_word_embeddings=config.tie_word_embeddings,
        # Llama-3's 256 special tokens close the vocabulary: <|begin_of_text|> is the first, <|end_of_text|> the next
        bos_token_id=config.vocab_size - 256 if config.vocab_size > 256 else None,
        eos_token_id=config.vocab_size - 255 if config.vocab_size > 256 else None,
    )  # fmt: skip


def hf_tensor(ckpt: Checkpoint, meta_name: str, dtype: torch.dtype) -> torch.Tensor:
    """One tensor in HF's layout: q/k rows permuted for rotate_half (new memory); the others as loaded (no copy)."""
    t = ckpt.tensor(meta_name)
    if heads := hf_layout.heads_of(meta_name):
        t = hf_layout.permute_to_hf(t, getattr(ckpt.config, heads))
    return t.to(dtype)


def build_model(ckpt: Checkpoint, dtype: torch.dtype, device: str = "cpu") -> LlamaForCausalLM:
    """The reference model. From an HF directory as users load it; from a Meta one, built on the meta device and
    assigned the loaded tensors (no random init, no copy but the permuted q/k and any dtype conversion)."""
    if ckpt.format == "hf":
        model = LlamaForCausalLM.from_pretrained(ckpt.path, dtype=dtype, attn_implementation=ATTENTION, local_files_only=True)
        return model.to(device).eval()
    cfg = hf_config(ckpt.config)
    cfg._attn_implementation = ATTENTION
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    sd = {hf_layout.meta_to_hf_name(n): hf_tensor(ckpt, n, dtype) for n in ckpt.names()}
    if cfg.tie_word_embeddings:
        del sd["lm_head.weight"]
    model.load_state_dict(sd, assign=True, strict=not cfg.tie_word_embeddings)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)  # its buffers were left on the meta device
    return model.to(device).eval()


# ---- hooks: what modules return, mapped to canonical names ---------------------------------------------------------


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _heads_from_projection(out: torch.Tensor, n: int) -> torch.Tensor:
    return out[0].view(out.shape[1], n, -1).transpose(0, 1)  # [1, T, n*hd] -> [n, T, hd]


def _layer_hooks(layer: LlamaDecoderLayer, index: int, config: ModelConfig, emit: Emit) -> list:
    """Forward hooks (returning None) on one decoder layer's modules."""
    n_rep, attn, mlp = config.n_rep, layer.self_attn, layer.mlp

    def qkv(part: str, n: int, interleave: bool):
        def hook(module, inputs, out):
            per_head = _heads_from_projection(out, n)  # [n, T, hd]
            for head in range(config.n_heads):
                x = per_head[head if part == "q" else kv_head(head, n_rep)]
                emit(head_name(index, head, part), hf_layout.half_split_to_interleaved(x) if interleave else x)

        return hook

    def out(part: str, which: str = "output"):
        def hook(module, inputs, output):
            emit(layer_name(index, part), (_first(inputs) if which == "input" else _first(output))[0])

        return hook

    return [
        layer.input_layernorm.register_forward_hook(out("attention_norm")),
        attn.q_proj.register_forward_hook(qkv("q", config.n_heads, True)),
        attn.k_proj.register_forward_hook(qkv("k", config.n_kv_heads, True)),
        attn.v_proj.register_forward_hook(qkv("v", config.n_kv_heads, False)),
        attn.o_proj.register_forward_hook(out("attention.output")),
        layer.post_attention_layernorm.register_forward_hook(out("attention_residual", "input")),
        layer.post_attention_layernorm.register_forward_hook(out("ffn_norm")),
        mlp.gate_proj.register_forward_hook(out("feed_forward.gate")),
        mlp.up_proj.register_forward_hook(out("feed_forward.up")),
        mlp.down_proj.register_forward_hook(out("feed_forward.hidden", "input")),
        mlp.down_proj.register_forward_hook(out("feed_forward.output")),
        layer.register_forward_hook(out("output")),
    ]


@contextlib.contextmanager
def _emitting(emit: Emit) -> Iterator[None]:
    global _emit
    _emit = emit
    try:
        yield
    finally:
        _emit = None


def _recorder(prefix: str) -> Emit:
    return lambda name, tensor: record(prefix + name, tensor)


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="layer", leave=False)


def run_model(model: LlamaForCausalLM, ckpt: Checkpoint, tokens: list[int], emit: Emit, progress: bool = False) -> torch.Tensor:
    """The full reference forward with every canonical name emitted; returns logits [T, V]."""
    config = ckpt.config
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, i, o: emit("embeddings", o[0])),
             model.model.norm.register_forward_hook(lambda m, i, o: emit("norm", o[0]))]  # fmt: skip
    for index, layer in enumerate(model.model.layers):
        hooks += _layer_hooks(layer, index, config, emit)
    bar = _progress_bar(progress, config.n_layers, "reference")
    if bar is not None:
        def tick(module, inputs, output) -> None:  # a hook that returns anything but None replaces the output
            bar.update()

        hooks += [layer.register_forward_hook(tick) for layer in model.model.layers]
    device = next(model.parameters()).device
    try:
        with _emitting(emit):
            logits = model(torch.tensor([tokens], device=device), use_cache=False).logits[0]  # [T, V]
    finally:
        for h in hooks:
            h.remove()
        if bar is not None:
            bar.close()
    emit("logits", logits)
    return logits


class _RMSNormFloat64(LlamaRMSNorm):
    """LlamaRMSNorm without its float32 cast, which would cap the oracle at float32 precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _norm_float64(weight: torch.Tensor, eps: float) -> _RMSNormFloat64:
    norm = _RMSNormFloat64(weight.shape[0], eps=eps).to(device=weight.device, dtype=weight.dtype)
    norm.weight = torch.nn.Parameter(weight, requires_grad=False)
    return norm


def _rotary_float64(cfg: LlamaConfig, n_tokens: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's RoPE cos/sin [1, T, hd] from HF's own inv_freq (float32 values, as HF and Meta define the frequencies),
    with angles, cos and sin in float64: LlamaRotaryEmbedding computes them in float32 whatever the model's dtype."""
    rotary = LlamaRotaryEmbedding(config=cfg)
    inv_freq = rotary.inv_freq.to(device=device, dtype=torch.float64)  # [hd/2], 3.1 scaling applied by HF
    angles = torch.outer(torch.arange(n_tokens, device=device, dtype=torch.float64), inv_freq)  # [T, hd/2]
    emb = torch.cat((angles, angles), dim=-1)  # [T, hd], HF's half-split order
    return (emb.cos() * rotary.attention_scaling)[None], (emb.sin() * rotary.attention_scaling)[None]


def run_oracle(ckpt: Checkpoint, tokens: list[int], emit: Emit, *, device: str = "cpu", chunk_rows: int = 16384,
               progress: bool = False) -> torch.Tensor:
    """The reference in float64, one decoder layer resident at a time (HF's own module classes), logits in chunks
    of vocabulary rows: the oracle costs one layer's weights in float64, not the whole model's. Where HF computes
    in float32 whatever the dtype (RMSNorm, RoPE angles, softmax) the oracle stays in float64."""
    f64, config = torch.float64, ckpt.config
    cfg = hf_config(config)
    cfg._attn_implementation = ATTENTION
    ids = torch.tensor(tokens, dtype=torch.long)
    x = ckpt.tensor("tok_embeddings.weight")[ids].to(device=device, dtype=f64)[None]  # [1, T, D]
    emit("embeddings", x[0])
    position_ids = torch.arange(len(tokens), device=device)[None]  # [1, T]
    cos_sin = _rotary_float64(cfg, len(tokens), device)
    mask = create_causal_mask(config=cfg, inputs_embeds=x, attention_mask=None, past_key_values=None, position_ids=position_ids)
    bar = _progress_bar(progress, config.n_layers, "float64 oracle")
    with _emitting(emit):
        for index in range(config.n_layers):
            with torch.device("meta"):
                layer = LlamaDecoderLayer(cfg, index)
            sd = {hf_layout.meta_to_hf_name(n).removeprefix(f"model.layers.{index}."): hf_tensor(ckpt, n, f64).to(device)
                  for n in ckpt.names() if n.startswith(f"layers.{index}.")}  # fmt: skip
            layer.load_state_dict(sd, assign=True)
            layer.input_layernorm = _norm_float64(layer.input_layernorm.weight, config.norm_eps)
            layer.post_attention_layernorm = _norm_float64(layer.post_attention_layernorm.weight, config.norm_eps)
            hooks = _layer_hooks(layer, index, config, emit)
            try:
                x = _first(layer(x, attention_mask=mask, position_embeddings=cos_sin, position_ids=position_ids))
            finally:
                for h in hooks:
                    h.remove()
            del layer, sd
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    h = _norm_float64(ckpt.tensor("norm.weight").to(device=device, dtype=f64), config.norm_eps)(x)[0]  # [T, D]
    emit("norm", h)
    weight = ckpt.tensor("output.weight")  # [V, D], read a chunk of rows at a time
    logits = torch.cat([h @ weight[i : i + chunk_rows].to(device=device, dtype=f64).T
                        for i in range(0, weight.shape[0], chunk_rows)], dim=-1)  # fmt: skip  [T, V]
    emit("logits", logits)
    return logits


def trace_reference(ckpt: Checkpoint, out: str | Path, *, prompt: str = DEFAULT_PROMPT, dtype: str = "float32",
                    names: list[str] | None = None, device: str = "cpu", progress: bool = False, oracle: bool = True,
                    **extra: Any) -> torch.Tensor:
    """The HF reference traced into `out`; with `oracle` (and dtype != float64) also its float64 run under `_oracle.`.

    A float64 reference is that same run: HF's modules would compute norms, RoPE angles and softmax in float32.
    """
    torch_dtype = parse_dtype(dtype)
    tokens = prompt_tokens(ckpt, prompt)
    with_oracle = oracle and torch_dtype != torch.float64
    meta = trace_metadata(ckpt, implementation="reference", dtype=dtype, tokens=tokens, prompt=prompt, device=device,
                          oracle="float64 (layer by layer)" if with_oracle else "none", **extra)  # fmt: skip
    with tracing(out, names=names, **meta), torch.inference_mode():
        record("tokens", torch.tensor(tokens))
        if torch_dtype == torch.float64:
            return run_oracle(ckpt, tokens, _recorder(""), device=device, progress=progress)
        model = build_model(ckpt, torch_dtype, device)
        logits = run_model(model, ckpt, tokens, _recorder(""), progress)
        del model
        if with_oracle:
            run_oracle(ckpt, tokens, _recorder(ORACLE_PREFIX), device=device, progress=progress)
    return logits
