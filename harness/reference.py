"""The Hugging Face reference: transformers' own `LlamaForCausalLM` on the same weights, traced at the canonical names.

Traced through the same adapter mechanism as any user's module (harness/adapter.py): what modules return by forward
hooks; what no module returns (rotated q/k, scores, probs, per-head outputs) from the attention function registered
through transformers' public AttentionInterface. Every tensor is mapped to the scratch layout: batch dropped, heads
split, q/k back to Meta's interleaved pairs, each query head given its KV head.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask, eager_mask
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    eager_attention_forward,
    repeat_kv,
)

from . import hf_layout
from .adapter import Adapter, drop_batch, input_of, interleave_halves, kv_to_query_heads, llama_taps, output_of
from .checkpoint import Checkpoint
from .names import ORACLE_PREFIX
from .recording import record
from .trace_file import Rows, kept_rows

# The KV cache's keyword: `cache` in transformers 5.2x (where `past_key_values` warns that 5.40 removes it), and
# `past_key_values` in the 5.x releases before it. Read off the signature once: no FutureWarning on a normal run.
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"

ATTENTION = "harness_traced"  # HF's eager attention, with a tap point for its scores


# The float64 oracle's attention runs a block of query rows at a time, at most this many scores per block (256 MiB in
# float64: 512 rows of 8 heads at 8192 tokens, 128 rows of an 8B's 32 heads). Unblocked, one [H, T, T] float64 of the
# tiny model at 8192 tokens is 4 GiB, and scores, masked scores and probs were held at once.
ORACLE_BLOCK_ELEMENTS = 1 << 25


def attention_scores(
    query: torch.Tensor, key: torch.Tensor, scaling: float, rows: list[int] | None = None
) -> torch.Tensor | Rows:
    """q_rotated @ k_rotated.T * scaling, before the mask, as eager attention computes them: a tap point.

    query [1, H, T, hd], key [1, KV, K, hd] (before repeat_kv), in HF's half-split q/k order -> [1, H, T, K]; with
    `rows`, the scores of those query rows only, `Rows` of [1, H, len(rows), K] (what a trace keeps of a long prompt's).
    """
    keys = repeat_kv(key, query.shape[1] // key.shape[1]).transpose(2, 3)  # [1, H, hd, K]
    if rows is None:
        return torch.matmul(query, keys) * scaling  # [1, H, T, K]
    return Rows(torch.matmul(query[:, :, rows], keys) * scaling, rows, query.shape[2])  # [1, H, R, K] of [1, H, T, K]


def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """HF's eager attention, unchanged, after the tap point for its scores (`attention_scores`, recomputed: only the
    rows a trace keeps, so a long prompt never holds a second [H, T, K]). In float64 (the oracle) a block of query rows
    at a time, with a float64 softmax, not eager's float32 one.
    -> (output [1, T, H, hd], probs [1, H, T, K]; the oracle's as `Rows`, the rows a trace keeps, past
    FULL_SQUARE_MAX_T)"""
    rows = kept_rows("scores", (query.shape[2], key.shape[2]))  # None: all of them, up to FULL_SQUARE_MAX_T tokens
    attention_scores(query, key, scaling, rows)  # the tap point, for the adapter's wrapper to record
    if query.dtype != torch.float64:
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    keys = repeat_kv(key, module.num_key_value_groups).transpose(2, 3)  # [1, H, hd, K]
    values = repeat_kv(value, module.num_key_value_groups)  # [1, H, K, hd]
    n_tokens, block = query.shape[2], max(1, ORACLE_BLOCK_ELEMENTS // (query.shape[1] * key.shape[2]))
    outputs, kept = [], []
    for start in range(0, n_tokens, block):
        stop = min(start + block, n_tokens)
        scores = torch.matmul(query[:, :, start:stop], keys) * scaling  # [1, H, B, K]
        probs = torch.softmax(scores + attention_mask[:, :, start:stop], dim=-1)  # [1, H, B, K]
        outputs.append(torch.matmul(probs, values))  # [1, H, B, hd]
        kept.append(
            probs if rows is None else probs[:, :, [r - start for r in rows if start <= r < stop]]
        )  # [1, H, b, K]
    output = torch.cat(outputs, dim=2)  # [1, H, T, hd]
    probs = torch.cat(kept, dim=2)  # [1, H, T or R, K]
    return output.transpose(1, 2).contiguous(), probs if rows is None else Rows(probs, rows, n_tokens)  # [1, T, H, hd]


def _attention(*args, **kwargs):
    """What transformers calls: `attention` looked up at call time, so that a run can wrap it (the adapter's taps)."""
    return attention(*args, **kwargs)


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, eager_mask)  # the mask eager attention gets: finfo.min above the diagonal


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
        model = LlamaForCausalLM.from_pretrained(
            ckpt.path, dtype=dtype, attn_implementation=ATTENTION, local_files_only=True
        )
        return model.to(device).eval()
    cfg = hf_layout.hf_config(ckpt.config)
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


# ---- the adapter: where each canonical name sits in transformers' LlamaForCausalLM --------------------------------

# Where Meta's modules sit in transformers' LlamaForCausalLM (see print(model)); q/k rows in half-split order.
HF_PATHS = {
    "tok_embeddings": "model.embed_tokens",
    "layers": "model.layers.{layer}",
    "attention_norm": "input_layernorm",
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "w1": "mlp.gate_proj",
    "w3": "mlp.up_proj",
    "w2": "mlp.down_proj",
    "norm": "model.norm",
}
_HEAD = "layers.{layer}.attention.heads.{head}"
HF_TAPS = llama_taps(HF_PATHS, half_split=True) | {
    f"{_HEAD}.q_rotated": input_of("harness.reference:attention_scores", drop_batch, interleave_halves, index=0),
    f"{_HEAD}.k_rotated": input_of(
        "harness.reference:attention_scores", drop_batch, kv_to_query_heads, interleave_halves, index=1
    ),
    f"{_HEAD}.scores": output_of("harness.reference:attention_scores", drop_batch),
    f"{_HEAD}.probs": output_of("harness.reference:attention", drop_batch, index=1),
}


# In a generation step the attention function's key and value are the whole cache (the step's appended): the step's own
# rotated q/k come from apply_rotary_pos_emb instead, and the cache is read where attention reads it.
_ROPE = "transformers.models.llama.modeling_llama:apply_rotary_pos_emb"
HF_CACHE_TAPS = {
    f"{_HEAD}.q_rotated": output_of(_ROPE, drop_batch, interleave_halves, index=0),
    f"{_HEAD}.k_rotated": output_of(_ROPE, drop_batch, kv_to_query_heads, interleave_halves, index=1),
    f"{_HEAD}.cache_k": input_of(
        "harness.reference:attention_scores", drop_batch, kv_to_query_heads, interleave_halves, index=1
    ),
    f"{_HEAD}.cache_v": input_of("harness.reference:attention", drop_batch, kv_to_query_heads, index=3),
}


def _run_hf(model: LlamaForCausalLM, tokens: torch.Tensor):
    return model(tokens[None], use_cache=False)


def _step_hf(model: LlamaForCausalLM, tokens: torch.Tensor, start_pos: int, cache: dict):
    """One generation step with HF's own KV cache, a `DynamicCache` (positions and mask follow its length)."""
    kv = cache.setdefault("past_key_values", DynamicCache(config=model.config))
    if kv.get_seq_length() != start_pos:
        raise RuntimeError(f"reference: KV cache holds {kv.get_seq_length()} positions at start_pos {start_pos}")
    return model(tokens[None], use_cache=True, **{CACHE: kv})


HUGGING_FACE = Adapter(
    build=build_model,
    taps=HF_TAPS,
    layers=HF_PATHS["layers"],
    final_norm=HF_PATHS["norm"],
    run=_run_hf,
    run_step=_step_hf,
    cache_taps=HF_CACHE_TAPS,
)


class _RMSNormFloat64(LlamaRMSNorm):
    """LlamaRMSNorm without its float32 cast, which would cap the oracle at float32 precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _norm_float64(weight: torch.Tensor, eps: float) -> _RMSNormFloat64:
    norm = _RMSNormFloat64(weight.shape[0], eps=eps).to(device=weight.device, dtype=weight.dtype)
    norm.weight = torch.nn.Parameter(weight, requires_grad=False)
    return norm


def _rotary_float64(
    cfg: LlamaConfig, n_tokens: int, device: str, start_pos: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's RoPE cos/sin [1, T, hd] from HF's own inv_freq (float32 values, as HF and Meta define the frequencies),
    with angles, cos and sin in float64: LlamaRotaryEmbedding computes them in float32 whatever the model's dtype."""
    rotary = LlamaRotaryEmbedding(config=cfg)
    inv_freq = rotary.inv_freq.to(device=device, dtype=torch.float64)  # [hd/2], 3.1 scaling applied by HF
    positions = torch.arange(start_pos, start_pos + n_tokens, device=device, dtype=torch.float64)  # [T]
    angles = torch.outer(positions, inv_freq)  # [T, hd/2]
    emb = torch.cat((angles, angles), dim=-1)  # [T, hd], HF's half-split order
    return (emb.cos() * rotary.attention_scaling)[None], (emb.sin() * rotary.attention_scaling)[None]


def _step_mask(n_tokens: int, start_pos: int, device: torch.device | str) -> torch.Tensor:
    """Eager attention's mask for a generation step: finfo.min where a key lies after the query.
    [1, 1, T, start_pos + T]"""
    mask = torch.full(
        (n_tokens, start_pos + n_tokens), torch.finfo(torch.float64).min, dtype=torch.float64, device=device
    )
    return torch.triu(mask, diagonal=start_pos + 1)[None, None]


def run_oracle(
    ckpt: Checkpoint,
    tokens: torch.Tensor,
    *,
    prefix: str = ORACLE_PREFIX,
    device: torch.device | str = "cpu",
    chunk_rows: int = 16384,
    start_pos: int = 0,
    cache: dict | None = None,
    return_logits: bool = False,
) -> torch.Tensor | None:
    """The reference in float64, one decoder layer resident at a time (HF's own module classes, traced by the same
    adapter), logits in chunks of vocabulary rows: the oracle costs one layer's weights in float64, not the whole
    model's. Where HF computes in float32 whatever the dtype (RMSNorm, RoPE angles, softmax) the oracle stays in
    float64. Logits: only the rows a trace keeps (every row up to FULL_LOGITS_MAX_ELEMENTS); with `return_logits` (a
    float64 reference is this run itself) every row, returned [T, V].
    Generation: with `cache` (the oracle's own dict, kept across steps) `tokens` sit at start_pos .. and use a float64
    DynamicCache kept in it."""
    f64, config = torch.float64, ckpt.config
    cfg = hf_layout.hf_config(config)
    cfg._attn_implementation = ATTENTION
    ids = tokens.to(dtype=torch.long, device="cpu")
    x = ckpt.tensor("tok_embeddings.weight")[ids].to(device=device, dtype=f64)[None]  # [1, T, D]
    record(prefix + "embeddings", x[0])
    position_ids = torch.arange(start_pos, start_pos + len(ids), device=device)[None]  # [1, T]
    cos_sin = _rotary_float64(cfg, len(ids), device, start_pos)
    past = None if cache is None else cache.setdefault("past_key_values", DynamicCache(config=cfg))
    if past is None:
        mask = create_causal_mask(
            config=cfg, inputs_embeds=x, attention_mask=None, position_ids=position_ids, **{CACHE: None}
        )
    else:
        mask = _step_mask(len(ids), start_pos, device)  # [1, 1, T, K]
    for index in range(config.n_layers):
        with torch.device("meta"):
            layer = LlamaDecoderLayer(cfg, index)
        sd = {
            hf_layout.meta_to_hf_name(n).removeprefix(f"model.layers.{index}."): hf_tensor(ckpt, n, f64).to(device)
            for n in ckpt.names()
            if n.startswith(f"layers.{index}.")
        }
        layer.load_state_dict(sd, assign=True)
        layer.input_layernorm = _norm_float64(layer.input_layernorm.weight, config.norm_eps)
        layer.post_attention_layernorm = _norm_float64(layer.post_attention_layernorm.weight, config.norm_eps)
        with HUGGING_FACE.attached(layer, config, prefix=prefix, layer=index, cache=past is not None):
            x = _first(
                layer(
                    x,
                    attention_mask=mask,
                    position_embeddings=cos_sin,
                    position_ids=position_ids,
                    use_cache=past is not None,
                    **{CACHE: past},
                )
            )
        del layer, sd
    h = _norm_float64(ckpt.tensor("norm.weight").to(device=device, dtype=f64), config.norm_eps)(x)[0]  # [T, D]
    record(prefix + "norm", h)
    weight = ckpt.tensor("output.weight")  # [V, D], read a chunk of rows at a time
    rows = None if return_logits else kept_rows("logits", (len(ids), weight.shape[0]))  # an 8B's [8192, V] is 8 GiB
    kept = h if rows is None else h[rows]  # [T or R, D]
    logits = torch.cat(
        [
            kept @ weight[i : i + chunk_rows].to(device=device, dtype=f64).T
            for i in range(0, weight.shape[0], chunk_rows)
        ],
        dim=-1,
    )  # [T or R, V]
    record(prefix + "logits", logits if rows is None else Rows(logits, rows, len(ids)))
    return logits if return_logits else None


def forward(
    checkpoint: Checkpoint, tokens: torch.Tensor, *, dtype: torch.dtype, device: torch.device | str, oracle: bool = True
) -> torch.Tensor:
    """The reference as an implementation of the harness's contract: logits [T, V], every canonical name recorded;
    with `oracle` also its float64 run under `_oracle.NAME`. A float64 reference is that float64 run itself: HF's
    modules would compute norms, RoPE angles and softmax in float32."""
    if dtype == torch.float64:
        return run_oracle(checkpoint, tokens, prefix="", device=device, return_logits=True)
    logits = HUGGING_FACE(checkpoint, tokens, dtype=dtype, device=device)
    if oracle:
        run_oracle(checkpoint, tokens, prefix=ORACLE_PREFIX, device=device)
    return logits


def decoder(oracle: bool = True) -> Callable[..., torch.Tensor]:
    """The reference's decode step (the decode contract), made fresh for each generation: HF with its DynamicCache (the
    Hugging Face adapter's decode step, given a cache dict of its own), and with `oracle` the float64 oracle's step
    under `_oracle.NAME` with a float64 cache of its own (re-reading one layer at a time). Both caches live here, not
    in the contract's `cache`, which the reference leaves alone."""
    hf_step, hf_cache, oracle_cache = HUGGING_FACE.decoder(), {}, {}

    def decode(
        checkpoint: Checkpoint,
        tokens: torch.Tensor,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        start_pos: int,
        cache: dict,
    ) -> torch.Tensor:
        if dtype == torch.float64:
            return run_oracle(
                checkpoint,
                tokens,
                prefix="",
                device=device,
                start_pos=start_pos,
                cache=oracle_cache,
                return_logits=True,
            )
        logits = hf_step(checkpoint, tokens, dtype=dtype, device=device, start_pos=start_pos, cache=hf_cache)
        if oracle:
            run_oracle(checkpoint, tokens, prefix=ORACLE_PREFIX, device=device, start_pos=start_pos, cache=oracle_cache)
        return logits

    return decode


def _first(x):
    return x[0] if isinstance(x, tuple) else x
