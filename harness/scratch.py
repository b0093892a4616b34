"""The from-scratch Llama-3 forward, step by step as the llama3-from-scratch notebook writes it, with tap points.

One layer's tensors are read at a time; one head at a time, as the notebook does. Shapes: T tokens, D dim, H heads,
KV kv heads, hd head_dim, F ffn_dim, V vocab, K key positions (start_pos + T). Each step is a small function so it can
be read (and mutated in tests). Generation (`cache`, `start_pos`) is Meta's: a prefill of the prompt at start_pos 0,
then one token at a time at start_pos P, P + 1, ..., each step's rotated keys and values appended to a KV cache of
plain tensors, `cache["layers.{l}.k"]` [KV, K, hd].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .checkpoint import Checkpoint
from .config import ModelConfig, rope_frequencies
from .isolation import layer_input, skip_layer
from .names import head_name, head_parts
from .recording import is_tracing, record


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # notebook: (tensor * torch.rsqrt(tensor.pow(2).mean(-1, keepdim=True) + norm_eps)) * norm_weights
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * weight


def upcast(dtype: torch.dtype) -> torch.dtype:
    """Where the notebook leaves the working dtype (RoPE, scores, softmax): float32, or float64 for a float64 run."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rope_freqs_cis(config: ModelConfig, n_tokens: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The notebook's freqs_cis: one unit complex number per (position, pair). [T, hd/2] complex."""
    freqs = rope_frequencies(config).to(upcast(dtype))  # [hd/2], 3.1 scaling applied when configured
    freqs_for_each_token = torch.outer(torch.arange(n_tokens, dtype=freqs.dtype), freqs)  # [T, hd/2]
    return torch.polar(torch.ones_like(freqs_for_each_token), freqs_for_each_token).to(device)  # [T, hd/2]


def step_freqs_cis(
    config: ModelConfig, start_pos: int, n_tokens: int, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """Meta's `freqs_cis[start_pos : start_pos + T]`: the rotations of this step's positions. [T, hd/2] complex."""
    return rope_freqs_cis(config, start_pos + n_tokens, dtype, device)[start_pos:]  # [T, hd/2]


def rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """RoPE: view interleaved pairs as complex numbers and multiply by freqs_cis. Stays in float32, as the notebook."""
    pairs = x.to(freqs_cis.real.dtype).unflatten(-1, (-1, 2))  # [..., T, hd/2, 2]
    as_complex = torch.view_as_complex(pairs)  # [..., T, hd/2]
    rotated_pairs = torch.view_as_real(as_complex * freqs_cis)  # [..., T, hd/2, 2]
    return rotated_pairs.flatten(-2)  # [..., T, hd]


def kv_head_of(head: int, config: ModelConfig) -> int:
    """Grouped-query attention: query head h reads KV head h // (n_heads / n_kv_heads) (the notebook's head // 4)."""
    return head // config.n_rep


def score_scale(config: ModelConfig) -> float:
    return config.head_dim**0.5  # the notebook's (128) ** 0.5


def causal_mask(n_tokens: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    mask = torch.full((n_tokens, n_tokens), float("-inf"), dtype=dtype, device=device)
    return torch.triu(mask, diagonal=1)  # [T, T]: -inf above the diagonal


def step_mask(n_tokens: int, start_pos: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Meta's mask for a step: every cached position visible, causal among the step's own T. [T, start_pos + T]"""
    cached = torch.zeros((n_tokens, start_pos), dtype=dtype, device=device)  # [T, start_pos]
    return torch.hstack([cached, causal_mask(n_tokens, dtype, device)])  # [T, start_pos + T]


def batch_positions(attention_mask: torch.Tensor, start_pos: int, n_tokens: int) -> torch.Tensor:
    """A padded batch's positions: each sequence counts only its real tokens (a left-padded one starts at 0 where its
    prompt starts). attention_mask [B, K] -> the step's positions [B, T]."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, K]
    return positions[:, start_pos : start_pos + n_tokens]  # [B, T]


def batch_freqs_cis(config: ModelConfig, positions: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """freqs_cis at each sequence's own positions. [B, T] -> [B, T, hd/2] complex."""
    table = rope_freqs_cis(config, int(positions.max()) + 1, dtype, device)  # [P, hd/2]
    return table[positions.to(table.device)]  # [B, T, hd/2]


def padding_mask(attention_mask: torch.Tensor, start_pos: int, n_tokens: int, dtype: torch.dtype, device):
    """The step's causal mask with every pad key masked too; a pad query still sees itself, so that no row is all
    -inf (its softmax would be NaN, and NaN times a masked 0 is NaN). attention_mask [B, K] -> [B, T, K]."""
    n_keys = start_pos + n_tokens
    causal = step_mask(n_tokens, start_pos, dtype, device)  # [T, K]
    pad_key = attention_mask[:, None, :n_keys].to(device) == 0  # [B, 1, K]
    own = torch.arange(n_keys, device=device)[None, :] == torch.arange(start_pos, n_keys, device=device)[:, None]
    return torch.where(pad_key & ~own, float("-inf"), causal)  # [B, T, K]


def new_keys_values(
    x_norm: torch.Tensor, weights: dict[str, torch.Tensor], config: ModelConfig, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's keys (rotated, float32 as the notebook's k_rotated) and values of every KV head, for the cache.
    ([B,] T, D) -> ([B,] KV, T, hd) each."""
    heads = (config.n_kv_heads, config.head_dim)
    k = (x_norm @ weights["attention.wk"].T).unflatten(-1, heads).transpose(-3, -2)  # [KV, T, hd]
    v = (x_norm @ weights["attention.wv"].T).unflatten(-1, heads).transpose(-3, -2)  # [KV, T, hd]
    return rotate(k, freqs_cis.unsqueeze(-3)), v  # [KV, T, hd] float32, [KV, T, hd]


def append_to_cache(
    cache: dict, layer: int, keys: torch.Tensor, values: torch.Tensor, start_pos: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta's KV cache as plain tensors: `cache["layers.{l}.k"]` holds the rotated keys of positions 0 .. start_pos - 1,
    [KV, start_pos, hd] ([B, KV, start_pos, hd] in a batch); the step's T keys (and values) go after them. -> every
    key and value so far [KV, K, hd]."""
    k_name, v_name = f"layers.{layer}.k", f"layers.{layer}.v"
    past_k = cache.get(k_name, keys[..., :0, :])[..., :start_pos, :]  # [KV, start_pos, hd]
    past_v = cache.get(v_name, values[..., :0, :])[..., :start_pos, :]  # [KV, start_pos, hd]
    cache[k_name] = torch.cat([past_k, keys], dim=-2)  # [KV, start_pos + T, hd]
    cache[v_name] = torch.cat([past_v, values], dim=-2)  # [KV, start_pos + T, hd]
    return cache[k_name], cache[v_name]


def softmax(masked_scores: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softmax(masked_scores, dim=-1)  # over keys, per query row


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def attention(
    layer: int,
    x_norm: torch.Tensor,
    weights: dict[str, torch.Tensor],
    config: ModelConfig,
    freqs_cis: torch.Tensor,
    mask: torch.Tensor,
    cache: dict | None = None,
    start_pos: int = 0,
) -> torch.Tensor:
    """Per-head attention of one layer, as the notebook's loop over heads. [T, D] -> [T, D].

    With a `cache` (generation), the step's keys and values are appended to it first, and each head attends over the
    cache: every position so far (K = start_pos + T) instead of the step's own T."""
    hd, dim = config.head_dim, config.dim
    if cache is not None:
        cache_k, cache_v = append_to_cache(
            cache, layer, *new_keys_values(x_norm, weights, config, freqs_cis), start_pos
        )
    wq = weights["attention.wq"].view(config.n_heads, hd, dim)  # [H, hd, D]
    wk = weights["attention.wk"].view(config.n_kv_heads, hd, dim)  # [KV, hd, D]
    wv = weights["attention.wv"].view(config.n_kv_heads, hd, dim)  # [KV, hd, D]
    head_outputs = []
    for head in range(config.n_heads):
        kv = kv_head_of(head, config)
        q = x_norm @ wq[head].T  # [T, hd]
        k = x_norm @ wk[kv].T  # [T, hd]
        v = x_norm @ wv[kv].T  # [T, hd]
        q_rotated = rotate(q, freqs_cis)  # [T, hd] float32
        k_rotated = rotate(k, freqs_cis)  # [T, hd] float32
        keys, values = (
            (k_rotated, v) if cache is None else (cache_k.select(-3, kv), cache_v.select(-3, kv))
        )  # [K, hd]: what this head attends
        if cache is not None:  # recorded before use: a cache of the wrong length is named here, not in a failing matmul
            record(f"layers.{layer}.attention.heads.{head}.cache_k", keys)
            record(f"layers.{layer}.attention.heads.{head}.cache_v", values)
        scores = (q_rotated @ keys.transpose(-2, -1)) / score_scale(config)  # [T, K] float32
        probs = softmax(scores + mask).to(x_norm.dtype)  # [T, K]
        output = probs @ values  # [T, hd]
        if is_tracing():  # the names cost more than the no-op record calls: build them only when tracing
            taps = dict(
                q=q, k=k, v=v, q_rotated=q_rotated, k_rotated=k_rotated, scores=scores, probs=probs, output=output
            )
            for part in head_parts(in_step=False):  # the cache's, in a step, are recorded above
                record(head_name(layer, head, part), taps[part])
        head_outputs.append(output)
    stacked = torch.cat(head_outputs, dim=-1)  # [T, H * hd]
    return stacked @ weights["attention.wo"].T  # [T, D]


def every_head(
    layer: int,
    x_norm: torch.Tensor,
    weights: dict[str, torch.Tensor],
    config: ModelConfig,
    freqs_cis: torch.Tensor,
    cache: dict | None,
    start_pos: int,
) -> dict[str, torch.Tensor]:
    """Every query head's q, k, v, rotated q and k [H, T, hd], and the keys and values it attends (`cache_k`,
    `cache_v` [H, K, hd]: the step's own outside generation; in a generation step, the cache with the step's added)."""
    hd = config.head_dim
    kv = torch.tensor([kv_head_of(head, config) for head in range(config.n_heads)])  # [H]: each query head's KV head
    q = (x_norm @ weights["attention.wq"].T).unflatten(-1, (config.n_heads, hd)).transpose(-3, -2)  # [H, T, hd]
    k = (x_norm @ weights["attention.wk"].T).unflatten(-1, (config.n_kv_heads, hd)).transpose(-3, -2)  # [KV, T, hd]
    v = (x_norm @ weights["attention.wv"].T).unflatten(-1, (config.n_kv_heads, hd)).transpose(-3, -2)  # [KV, T, hd]
    k, v = k.index_select(-3, kv), v.index_select(-3, kv)  # [H, T, hd]
    q_rotated = rotate(q, freqs_cis.unsqueeze(-3))  # [H, T, hd] float32
    k_rotated = rotate(k, freqs_cis.unsqueeze(-3))  # [H, T, hd] float32
    keys, values = k_rotated, v  # [H, K, hd]
    if cache is not None:  # generation: attend over the cache, this step's keys and values appended
        cache_k, cache_v = append_to_cache(
            cache, layer, *new_keys_values(x_norm, weights, config, freqs_cis), start_pos
        )
        keys, values = cache_k.index_select(-3, kv), cache_v.index_select(-3, kv)  # [H, K, hd]
    return dict(q=q, k=k, v=v, q_rotated=q_rotated, k_rotated=k_rotated, cache_k=keys, cache_v=values)


def attention_all_heads(
    layer: int,
    x_norm: torch.Tensor,
    weights: dict[str, torch.Tensor],
    config: ModelConfig,
    freqs_cis: torch.Tensor,
    mask: torch.Tensor,
    cache: dict | None = None,
    start_pos: int = 0,
) -> torch.Tensor:
    """The same attention with every head at once (batched matmuls, `forward(vectorized=True)`); same names recorded.

    Agrees with the per-head loop within float32 rounding (tests/test_scratch.py). [T, D] -> [T, D].
    """
    taps = every_head(layer, x_norm, weights, config, freqs_cis, cache, start_pos)
    q_rotated, keys, values = taps["q_rotated"], taps["cache_k"], taps["cache_v"]  # [H, T, hd], [H, K, hd] x 2
    scores = (q_rotated @ keys.transpose(-2, -1)) / score_scale(config)  # [H, T, K] float32
    probs = torch.nn.functional.softmax(scores + mask.unsqueeze(-3), dim=-1).to(x_norm.dtype)  # [H, T, K], over keys
    output = probs @ values  # [H, T, hd]
    if is_tracing():
        taps.update(scores=scores, probs=probs, output=output)  # cache_k, cache_v: recorded in a generation step only
        for head in range(config.n_heads):
            for part in head_parts(in_step=cache is not None):
                record(head_name(layer, head, part), taps[part].select(-3, head))
    stacked = output.transpose(-3, -2).flatten(-2)  # [T, H * hd]
    return stacked @ weights["attention.wo"].T  # [T, D]


def attention_sdpa(
    layer: int,
    x_norm: torch.Tensor,
    weights: dict[str, torch.Tensor],
    config: ModelConfig,
    freqs_cis: torch.Tensor,
    mask: torch.Tensor,
    cache: dict | None = None,
    start_pos: int = 0,
) -> torch.Tensor:
    """Fused attention, as most served models run it (`forward(attention="sdpa")`): every head at once through
    `torch.nn.functional.scaled_dot_product_attention` in the working dtype, so no scores or probs exist to record
    (the rest as `attention_all_heads`). A legitimate precision choice: it must pass. [T, D] -> [T, D]."""
    taps = every_head(layer, x_norm, weights, config, freqs_cis, cache, start_pos)
    q_rotated, keys, values = taps["q_rotated"], taps["cache_k"], taps["cache_v"]  # [H, T, hd], [H, K, hd] x 2
    dtype = x_norm.dtype  # the fused kernel runs in the working dtype: q, k and the mask cast to it
    output = torch.nn.functional.scaled_dot_product_attention(
        q_rotated.to(dtype),
        keys.to(dtype),
        values,
        attn_mask=mask.unsqueeze(-3).to(dtype),
        scale=1 / score_scale(config),
    )  # [H, T, hd]
    if is_tracing():
        taps.update(output=output)
        for head in range(config.n_heads):
            for part in head_parts(in_step=cache is not None):
                if part in taps:  # no scores, no probs: fused
                    record(head_name(layer, head, part), taps[part].select(-3, head))
    stacked = output.transpose(-3, -2).flatten(-2)  # [T, H * hd]
    return stacked @ weights["attention.wo"].T  # [T, D]


def feed_forward(layer: int, x_norm: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """SwiGLU: w2(silu(w1 x) * w3 x). [T, D] -> [T, D]."""
    gate = x_norm @ weights["feed_forward.w1"].T  # [T, F]
    up = x_norm @ weights["feed_forward.w3"].T  # [T, F]
    hidden = swiglu(gate, up)  # [T, F]
    output = hidden @ weights["feed_forward.w2"].T  # [T, D]
    record(f"layers.{layer}.feed_forward.gate", gate)
    record(f"layers.{layer}.feed_forward.up", up)
    record(f"layers.{layer}.feed_forward.hidden", hidden)
    record(f"layers.{layer}.feed_forward.output", output)
    return output


def layer_weights(
    ckpt: Checkpoint, layer: int, dtype: torch.dtype, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """This layer's tensors, read from the checkpoint now (one layer resident at a time, as the notebook)."""
    parts = (
        "attention.wq",
        "attention.wk",
        "attention.wv",
        "attention.wo",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
        "attention_norm",
        "ffn_norm",
    )
    return {p: ckpt.tensor(f"layers.{layer}.{p}.weight").to(device=device, dtype=dtype) for p in parts}


def transformer_layer(
    layer: int,
    x: torch.Tensor,
    weights: dict[str, torch.Tensor],
    config: ModelConfig,
    freqs_cis: torch.Tensor,
    mask: torch.Tensor,
    attend=None,
    **cache,
) -> torch.Tensor:
    """One decoder layer (`attend`: `attention`, one head at a time, unless given; `cache`: generation's `cache` and
    `start_pos`, passed on to it). [T, D] -> [T, D]."""
    x_norm = rms_norm(x, weights["attention_norm"], config.norm_eps)  # [T, D]
    record(f"layers.{layer}.attention_norm", x_norm)
    attention_output = (attend or attention)(layer, x_norm, weights, config, freqs_cis, mask, **cache)  # [T, D]
    record(f"layers.{layer}.attention.output", attention_output)
    attention_residual = x + attention_output  # [T, D]
    record(f"layers.{layer}.attention_residual", attention_residual)
    h_norm = rms_norm(attention_residual, weights["ffn_norm"], config.norm_eps)  # [T, D]
    record(f"layers.{layer}.ffn_norm", h_norm)
    output = attention_residual + feed_forward(layer, h_norm, weights)  # [T, D]
    record(f"layers.{layer}.output", output)
    return output


def forward(
    checkpoint: Checkpoint,
    tokens: torch.Tensor | Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool = False,
    vectorized: bool = False,
    attention: str | None = None,
    start_pos: int = 0,
    cache: dict | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens [T] -> logits [T, V], recording every canonical name (the harness records `tokens`).

    `vectorized` computes all heads of a layer at once (same names, same values within float32 rounding);
    `attention="sdpa"` fuses them in torch's scaled_dot_product_attention (no scores, no probs recorded). Each
    layer's input passes through `harness.layer_input`: in isolated mode it is the reference's input to that layer,
    so a bug is found in its own layer instead of drowned in drift; otherwise it is `x` itself.
    Generation (Meta's): `tokens` sit at positions start_pos .. start_pos + T - 1 and attend over a KV `cache` (a dict,
    empty for the prefill at start_pos 0, the same dict at every later step), which this call extends.
    A padded batch (`attention_mask` [B, K], 1 for a real token): tokens [B, T] -> logits [B, T, V], every tensor with
    a leading batch axis, each sequence at its own positions, pad keys masked (harness/batch.py).
    """
    config = checkpoint.config
    tokens = torch.as_tensor(tokens, dtype=torch.long).cpu()  # [T], or [B, T]
    ids = tokens.flatten()  # [T] or [B * T]
    x = checkpoint.take("tok_embeddings.weight", ids).view(*tokens.shape, -1).to(device=device, dtype=dtype)  # [T, D]
    record("embeddings", x)
    n_tokens = tokens.shape[-1]
    if attention_mask is not None:  # a padded batch: positions and mask per sequence
        freqs_cis = batch_freqs_cis(config, batch_positions(attention_mask, start_pos, n_tokens), dtype, device)
        mask = padding_mask(attention_mask, start_pos, n_tokens, upcast(dtype), device)  # [B, T, K]
        kv_cache = {} if cache is None else {"cache": cache, "start_pos": start_pos}
    elif cache is None:
        freqs_cis = rope_freqs_cis(config, tokens.shape[0], dtype, device)  # [T, hd/2]
        mask = causal_mask(tokens.shape[0], upcast(dtype), device)  # [T, T]
        kv_cache = {}
    else:
        freqs_cis = step_freqs_cis(config, start_pos, tokens.shape[0], dtype, device)  # [T, hd/2]
        mask = step_mask(tokens.shape[0], start_pos, upcast(dtype), device)  # [T, start_pos + T]
        kv_cache = {"cache": cache, "start_pos": start_pos}
    layers = range(config.n_layers)
    if progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc="scratch", unit="layer", leave=False)
    heads = {"attend": attention_all_heads} if vectorized else {}  # one head at a time by default, as the notebook
    heads = {"attend": attention_sdpa} if attention == "sdpa" else heads  # fused: no scores, no probs
    for layer in layers:
        if skip_layer(layer):  # --layers A:B, isolated: layer A's input comes from the reference
            continue
        x = layer_input(layer, x)  # isolated mode: the reference's input to this layer
        x = transformer_layer(
            layer, x, layer_weights(checkpoint, layer, dtype, device), config, freqs_cis, mask, **heads, **kv_cache
        )
    x = layer_input(config.n_layers, x)
    norm = rms_norm(x, checkpoint.tensor("norm.weight").to(device=device, dtype=dtype), config.norm_eps)  # [T, D]
    record("norm", norm)
    logits = output_logits(checkpoint, norm)  # [T, V]
    record("logits", logits)
    return logits


def output_logits(checkpoint: Checkpoint, norm: torch.Tensor, rows: int = 16384) -> torch.Tensor:
    """norm @ output.weight.T, the output matrix read a chunk of vocabulary rows at a time (a 405B's is 4 GiB in
    bfloat16). [T, D] -> [T, V]"""
    n_vocab = checkpoint.shape("output.weight")[0]
    chunks = [
        norm @ checkpoint.rows("output.weight", i, min(i + rows, n_vocab)).to(device=norm.device, dtype=norm.dtype).T
        for i in range(0, n_vocab, rows)
    ]  # each [T, rows]
    return torch.cat(chunks, dim=-1)  # [T, V]
