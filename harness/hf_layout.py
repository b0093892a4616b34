"""Meta <-> Hugging Face: tensor names, and the q/k row order that HF's `rotate_half` expects.

Meta rotates interleaved pairs (x0, x1), (x2, x3), ...; HF rotates halves (x0, x_{d/2}), ... so wq/wk rows are permuted.
Public, for adapters that load a checkpoint into a model of HF's layout (docs/adapters.md): a Meta tensor `name` goes
to HF as `meta_to_hf_name(name)`, its rows `permute_to_hf(w, getattr(config, heads_of(name)))` when `heads_of` says so.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from .config import ModelConfig

if TYPE_CHECKING:
    from transformers import LlamaConfig

# HF name -> Meta name, with {} for the layer index (as gpt-fast's convert_hf_checkpoint.py).
HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
META_TO_HF = {meta: hf for hf, meta in HF_TO_META.items()}

__all__ = [
    "HF_TO_META",
    "META_TO_HF",
    "half_split_to_interleaved",
    "heads_of",
    "hf_config",
    "hf_to_meta_name",
    "meta_to_hf_name",
    "permute_to_hf",
    "permute_to_meta",
]


def _translate(name: str, table: dict[str, str]) -> str | None:
    layer = re.search(r"\.(\d+)\.", name)
    key = name.replace(f".{layer[1]}.", ".{}.", 1) if layer else name
    if key not in table:
        return None
    return table[key].format(layer[1]) if layer else table[key]


def hf_to_meta_name(name: str) -> str | None:
    """An HF tensor's Meta name: "model.layers.3.self_attn.q_proj.weight" -> "layers.3.attention.wq.weight"; None
    for a name with no Meta counterpart (e.g. "model.layers.0.self_attn.rotary_emb.inv_freq")."""
    return _translate(name, HF_TO_META)


def meta_to_hf_name(name: str) -> str | None:
    """A Meta tensor's HF name: "layers.3.attention.wq.weight" -> "model.layers.3.self_attn.q_proj.weight"; None
    for a name with no HF counterpart (e.g. "rope.freqs")."""
    return _translate(name, META_TO_HF)


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved q/k rows -> HF's half-split rows, per head (the permute of convert_llama_weights_to_hf.py).

    w: wq [n_heads * hd, dim] with `n_heads`, or wk [n_kv_heads * hd, dim] with `n_kv_heads` (see `heads_of`)."""
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def permute_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_to_hf`: HF's half-split q/k rows -> Meta's interleaved ones (what reading an HF
    checkpoint into Meta's layout does)."""
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def half_split_to_interleaved(x: torch.Tensor) -> torch.Tensor:
    """An HF per-head vector [..., head_dim] in half-split order -> Meta's interleaved pair order."""
    half = x.shape[-1] // 2
    return torch.stack([x[..., :half], x[..., half:]], dim=-1).flatten(-2)  # [..., half, 2] -> [..., head_dim]


def heads_of(meta_name: str) -> str | None:
    """Which head count permutes this tensor: 'n_heads' for wq, 'n_kv_heads' for wk, None otherwise."""
    if meta_name.endswith("attention.wq.weight"):
        return "n_heads"
    if meta_name.endswith("attention.wk.weight"):
        return "n_kv_heads"
    return None


def hf_config(config: ModelConfig) -> LlamaConfig:
    """The transformers LlamaConfig of a harness config (Meta's FFN width, llama3 rope scaling, tied embeddings)."""
    from transformers import LlamaConfig

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if s := config.rope_scaling:
        rope = {
            "rope_type": "llama3",
            "rope_theta": config.rope_theta,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps,
        max_position_embeddings=config.max_seq_len,
        rope_parameters=rope,
        tie_word_embeddings=config.tie_word_embeddings,
        # Llama-3's 256 special tokens close the vocabulary: <|begin_of_text|> is the first, <|end_of_text|> the next
        bos_token_id=config.vocab_size - 256 if config.vocab_size > 256 else None,
        eos_token_id=config.vocab_size - 255 if config.vocab_size > 256 else None,
    )
