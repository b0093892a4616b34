"""examples/my_llama.py with fused attention: torch.nn.functional.scaled_dot_product_attention over all heads at once,
so no scores or probs exist to record; every other canonical name is recorded (tests/test_plugin.py's fixture for a
fused-attention implementation, which the suite must pass, skipping the two names with a reason).
"""

import torch

import harness


def rms_norm(x, weight, eps):
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * weight


def forward(checkpoint, tokens, *, dtype, device, start_pos=0, cache=None):
    config = checkpoint.config
    weight = lambda name: checkpoint.tensor(name).to(device=device, dtype=dtype)  # one tensor, read when asked
    T, hd = len(tokens), config.head_dim
    K = start_pos + T  # key positions this call attends to: the cached ones, then its own T

    # RoPE as the notebook: one unit complex number per (position, pair), in float32
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))  # [hd/2]
    if config.rope_scaling is not None:  # Llama 3.1: long wavelengths divided by the factor, short ones kept
        freqs = scale_frequencies(freqs, config.rope_scaling)
    positions = torch.arange(start_pos, K).float()  # [T]: a decoded token sits after everything cached
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(positions, freqs)).to(device)  # [T, hd/2]

    x = checkpoint.tensor("tok_embeddings.weight")[tokens.cpu()].to(device=device, dtype=dtype)  # [T, D]
    harness.record("embeddings", x)
    for layer in range(config.n_layers):
        x = harness.layer_input(layer, x)
        p = f"layers.{layer}."
        x_norm = rms_norm(x, weight(p + "attention_norm.weight"), config.norm_eps)  # [T, D]
        harness.record(p + "attention_norm", x_norm)
        wq = weight(p + "attention.wq.weight").view(config.n_heads, hd, config.dim)  # [H, hd, D]
        wk = weight(p + "attention.wk.weight").view(config.n_kv_heads, hd, config.dim)  # [KV, hd, D]
        wv = weight(p + "attention.wv.weight").view(config.n_kv_heads, hd, config.dim)  # [KV, hd, D]
        group = config.n_heads // config.n_kv_heads  # grouped-query attention: query heads per KV head
        q = (x_norm @ wq.flatten(0, 1).T).view(T, config.n_heads, hd).transpose(0, 1)  # [H, T, hd]
        k = (x_norm @ wk.flatten(0, 1).T).view(T, config.n_kv_heads, hd).transpose(0, 1)  # [KV, T, hd]
        v = (x_norm @ wv.flatten(0, 1).T).view(T, config.n_kv_heads, hd).transpose(0, 1)  # [KV, T, hd]
        q_rotated, k_rotated = rotate(q, freqs_cis), rotate(k, freqs_cis)  # [H, T, hd], [KV, T, hd] float32
        keys, values = k_rotated, v
        if cache is not None:  # KV cache: each KV head's rotated keys and values of every position so far
            past_k, past_v = cache.get(p + "k", k_rotated[:, :0]), cache.get(p + "v", v[:, :0])
            cache[p + "k"], cache[p + "v"] = torch.cat([past_k, k_rotated], 1), torch.cat([past_v, v], 1)
            keys, values = cache[p + "k"], cache[p + "v"]  # [KV, K, hd]
        # fused attention over every head at once, in float32 like the notebook's scores: no [T, K] scores to record.
        # The prefill is causal; a decode step's queries see every cached key and their own past.
        output = torch.nn.functional.scaled_dot_product_attention(
            q_rotated,  # [H, T, hd]
            keys.repeat_interleave(group, 0),  # [H, K, hd]
            values.float().repeat_interleave(group, 0),  # [H, K, hd]
            attn_mask=None if start_pos == 0 else torch.ones(T, K, dtype=torch.bool, device=device).tril(start_pos),
            is_causal=start_pos == 0,
        ).to(dtype)  # [H, T, hd]
        for head in range(config.n_heads):
            kv, h = head // group, f"{p}attention.heads.{head}."
            cached = dict(cache_k=keys[kv], cache_v=values[kv]) if cache is not None else {}
            recorded = dict(q=q[head], k=k[kv], v=v[kv], q_rotated=q_rotated[head], k_rotated=k_rotated[kv])
            for name, value in dict(**recorded, **cached, output=output[head]).items():
                harness.record(h + name, value)
        attention = output.transpose(0, 1).flatten(1) @ weight(p + "attention.wo.weight").T  # [T, H * hd] -> [T, D]
        harness.record(p + "attention.output", attention)
        x = x + attention
        harness.record(p + "attention_residual", x)
        h_norm = rms_norm(x, weight(p + "ffn_norm.weight"), config.norm_eps)  # [T, D]
        harness.record(p + "ffn_norm", h_norm)
        gate = h_norm @ weight(p + "feed_forward.w1.weight").T  # [T, F]
        up = h_norm @ weight(p + "feed_forward.w3.weight").T  # [T, F]
        hidden = torch.nn.functional.silu(gate) * up  # [T, F]
        ffn = hidden @ weight(p + "feed_forward.w2.weight").T  # [T, D]
        for name, value in (("gate", gate), ("up", up), ("hidden", hidden), ("output", ffn)):
            harness.record(p + "feed_forward." + name, value)
        x = x + ffn
        harness.record(p + "output", x)
    x = harness.layer_input(config.n_layers, x)
    norm = rms_norm(x, weight("norm.weight"), config.norm_eps)  # [T, D]
    harness.record("norm", norm)
    logits = norm @ weight("output.weight").T  # [T, V]
    harness.record("logits", logits)
    return logits


def rotate(x, freqs_cis):
    """Interleaved pairs as complex numbers, times freqs_cis. [..., T, hd] -> [..., T, hd] float32."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [..., T, hd/2]
    return torch.view_as_real(pairs * freqs_cis).flatten(-2)


def scale_frequencies(freqs, s):
    """Llama 3.1's `apply_scaling`: wavelengths over original/low_freq_factor divided by `factor`, under
    original/high_freq_factor kept, smoothly mixed between."""
    wavelen = 2 * torch.pi / freqs
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    mixed = (1 - smooth) * freqs / s.factor + smooth * freqs
    low, high = (
        s.original_max_position_embeddings / s.low_freq_factor,
        s.original_max_position_embeddings / s.high_freq_factor,
    )
    return torch.where(wavelen > low, freqs / s.factor, torch.where(wavelen < high, freqs, mixed))
