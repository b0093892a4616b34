"""The Hugging Face reference: transformers' own `LlamaForCausalLM` on the same weights, traced at the canonical names.

Traced through the same adapter mechanism as any user's module (harness/adapter.py): what modules return by forward
hooks; what no module returns (rotated q/k, scores, probs, per-head outputs) from the attention function registered
through transformers' public AttentionInterface. Every tensor is mapped to the scratch layout: batch dropped, heads
split, q/k back to Meta's interleaved pairs, each query head given its KV head.
"""

from __future__ import annotations

import ctypes
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
from .isolation import RangeEnd, layer_range, skip_layer
from .names import ORACLE_PREFIX
from .recording import record
from .trace_file import Rows, kept_rows
from .weights import LOGIT_ROWS, ReadEmbedding, ReadLinear, norm_of, read_layer

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


def _pass_through(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden_states  # a decoder layer skipped (harness.skip_layer): its input, unchanged


def build_model(ckpt: Checkpoint, dtype: torch.dtype, device: str = "cpu") -> LlamaForCausalLM:
    """The reference model, from a Meta or an HF directory alike: transformers' LlamaForCausalLM built on the meta
    device, then given modules that read their weights when they run (the embeddings a row lookup, each projection
    whole or by blocks of rows, the logits a chunk of vocabulary rows at a time), so that one projection's weights are
    resident at a time; the norms' weights loaded now. A layer that an isolated `--layers` run skips passes its input
    through (harness.skip_layer)."""
    cfg = hf_layout.hf_config(ckpt.config)
    cfg._attn_implementation = ATTENTION
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.model.embed_tokens = ReadEmbedding(ckpt, dtype, device)
    for index, layer in enumerate(model.model.layers):
        read_layer(layer, ckpt, dtype, device)
        if skip_layer(index):
            layer.forward = _pass_through
    model.model.norm = norm_of(ckpt.tensor("norm.weight").to(device=device, dtype=dtype), ckpt.config.norm_eps)
    model.lm_head = ReadLinear(ckpt, "output.weight", dtype, device, block_rows=LOGIT_ROWS)
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
    chunk_rows: int = LOGIT_ROWS,
    start_pos: int = 0,
    cache: dict | None = None,
    return_logits: bool = False,
    layers: range | None = None,
    layer_input: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The reference in float64, one decoder layer at a time (HF's own module classes, traced by the same adapter),
    each projection's weights read in float64 when it runs (by blocks of rows past BLOCK_BYTES), logits in chunks of
    vocabulary rows: the oracle holds at most about BLOCK_BYTES of float64 weights, whatever the model's size. Where
    HF computes in float32 whatever the dtype (RMSNorm, RoPE angles, softmax) the oracle stays in float64. Logits:
    only the rows a trace keeps (every row up to FULL_LOGITS_MAX_ELEMENTS); with `return_logits` (a float64 reference
    is this run itself) every row, returned [T, V].
    `layers` (`--layers A:B`): only those decoder layers, the first fed `layer_input` [1, T, D] (the working-dtype
    reference's input to it) unless it is layer 0; the final norm and logits only when the range reaches the end.
    Generation: with `cache` (the oracle's own dict, kept across steps) `tokens` sit at start_pos .. and use a float64
    DynamicCache kept in it."""
    f64, config = torch.float64, ckpt.config
    layers = layers or range(config.n_layers)
    cfg = hf_layout.hf_config(config)
    cfg._attn_implementation = ATTENTION
    ids = tokens.to(dtype=torch.long, device="cpu")
    if layers.start == 0:
        x = ckpt.take("tok_embeddings.weight", ids).to(device=device, dtype=f64)[None]  # [1, T, D]
        record(prefix + "embeddings", x[0])
    else:
        x = layer_input.to(device=device, dtype=f64)  # [1, T, D]
    position_ids = torch.arange(start_pos, start_pos + len(ids), device=device)[None]  # [1, T]
    cos_sin = _rotary_float64(cfg, len(ids), device, start_pos)
    past = None if cache is None else cache.setdefault("past_key_values", DynamicCache(config=cfg))
    if past is None:
        mask = create_causal_mask(
            config=cfg, inputs_embeds=x, attention_mask=None, position_ids=position_ids, **{CACHE: None}
        )
    else:
        mask = _step_mask(len(ids), start_pos, device)  # [1, 1, T, K]
    call = dict(attention_mask=mask, position_embeddings=cos_sin, position_ids=position_ids, **{CACHE: past})
    for index in layers:
        x = _oracle_layer(ckpt, cfg, index, x, prefix, device, call)  # [1, T, D]
    if layers.stop < config.n_layers:
        return None
    h = norm_of(ckpt.tensor("norm.weight").to(device=device, dtype=f64), config.norm_eps, _RMSNormFloat64)(x)[0]
    record(prefix + "norm", h)  # [T, D]
    return _oracle_logits(ckpt, h, prefix, chunk_rows, return_logits)


def _oracle_layer(
    ckpt: Checkpoint, cfg: LlamaConfig, index: int, x: torch.Tensor, prefix: str, device, call: dict
) -> torch.Tensor:
    """Decoder layer `index` in float64, built on the meta device and given its weights (read as it runs), traced under
    `prefix`, then dropped. [1, T, D] -> [1, T, D]"""
    with torch.device("meta"):
        layer = LlamaDecoderLayer(cfg, index)
    read_layer(layer, ckpt, torch.float64, device, norm=_RMSNormFloat64)
    past = call[CACHE]
    with HUGGING_FACE.attached(layer, ckpt.config, prefix=prefix, layer=index, cache=past is not None):
        x = _first(layer(x, use_cache=past is not None, **call))
    del layer
    _return_freed_memory()
    return x


def _return_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim): glibc keeps what a layer's activations
    and reads freed, pinned between small live objects, so the verify's peak grew with depth (6 MB a layer at 8B width,
    measured; none with this). Nothing where there is no glibc."""
    trim = getattr(_C_LIBRARY, "malloc_trim", None)
    if trim is not None:
        trim(0)


try:
    _C_LIBRARY = ctypes.CDLL(None)  # the process's own C library (glibc, musl, libSystem)
except (OSError, TypeError):  # Windows has no such handle
    _C_LIBRARY = None


def _oracle_logits(ckpt: Checkpoint, h: torch.Tensor, prefix: str, chunk_rows: int, return_logits: bool):
    """The float64 logits of the final norm's output h [T, D], the output matrix read a chunk of rows at a time: only
    the rows a trace keeps (an 8B's [8192, V] is 8 GiB), unless `return_logits` (then every row, returned [T, V])."""
    n_vocab = ckpt.shape("output.weight")[0]
    rows = None if return_logits else kept_rows("logits", (h.shape[0], n_vocab))
    kept = h if rows is None else h[rows]  # [T or R, D]
    logits = torch.cat(
        [
            kept @ ckpt.rows("output.weight", i, min(i + chunk_rows, n_vocab)).to(device=h.device, dtype=h.dtype).T
            for i in range(0, n_vocab, chunk_rows)
        ],
        dim=-1,
    )  # [T or R, V]
    record(prefix + "logits", logits if rows is None else Rows(logits, rows, h.shape[0]))
    return logits if return_logits else None


def forward(
    checkpoint: Checkpoint, tokens: torch.Tensor, *, dtype: torch.dtype, device: torch.device | str, oracle: bool = True
) -> torch.Tensor | None:
    """The reference as an implementation of the harness's contract: logits [T, V], every canonical name recorded;
    with `oracle` also its float64 run under `_oracle.NAME`. A float64 reference is that float64 run itself: HF's
    modules would compute norms, RoPE angles and softmax in float32.
    In a `--layers A:B` run HF's model runs from the embeddings to layer B - 1 (the harness stops it there) and the
    oracle over A .. B - 1 only, from HF's input to layer A: None when the range ends before the logits."""
    layers = _layers(checkpoint)
    if dtype == torch.float64:  # from the embeddings, as HF's model would run: the range's input is its own
        return run_oracle(checkpoint, tokens, prefix="", device=device, return_logits=True, layers=range(layers.stop))
    model = build_model(checkpoint, dtype, device)
    inputs = {}  # the input of the range's first layer, for the oracle to start from

    def keep(module, args, kwargs):
        inputs["x"] = args[0] if args else kwargs["hidden_states"]

    with HUGGING_FACE.attached(model, checkpoint.config, n_tokens=len(tokens)):
        first = model.model.layers[layers.start].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            logits = _run_hf(model, tokens.to(device)).logits[0]  # [T, V]
        except RangeEnd:
            logits = None  # the range ended before the logits
        finally:
            first.remove()
    if oracle:
        run_oracle(checkpoint, tokens, prefix=ORACLE_PREFIX, device=device, layers=layers, layer_input=inputs.get("x"))
    return logits


def _layers(checkpoint: Checkpoint) -> range:
    """The decoder layers this run judges: a `--layers` range, or all of them."""
    judged = layer_range()
    return range(judged.start, judged.stop) if judged is not None else range(checkpoint.config.n_layers)


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
