"""A Llama-3 written the way the llama3-from-scratch notebook writes it, made ready for the harness.

Verify it:  python -m harness verify CHECKPOINT --impl examples/my_llama.py:forward [--dtype bfloat16] [--isolated]
            python -m harness verify CHECKPOINT --impl examples/my_llama.py:forward --generate 8   (with its KV cache)
What it takes: `harness.record(name, tensor)` at the canonical names (README: "Canonical names"), and each layer's input
passed through `harness.layer_input` so that `--isolated` can hand every layer the reference's input. For generation,
the decode contract's `start_pos` and `cache` (docs/generation.md): the harness calls it once for the prompt
(start_pos 0, cache empty), then once per decoded token, always with the same cache dict. For a padded batch
(`--prompts FILE`), the batched contract's `attention_mask` [B, K] (docs/batches.md): tokens [B, T], every tensor with
a leading batch axis, each sequence at its own positions, pad keys masked.
"""

import torch

import harness


def rms_norm(x, weight, eps):
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * weight


def forward(checkpoint, tokens, *, dtype, device, start_pos=0, cache=None, attention_mask=None):
    config = checkpoint.config
    weight = lambda name: checkpoint.tensor(name).to(device=device, dtype=dtype)  # one tensor, read when asked
    T, hd = tokens.shape[-1], config.head_dim  # tokens [T], or [B, T] in a batch
    K = start_pos + T  # key positions this call attends to: the cached ones, then its own T

    # RoPE as the notebook: one unit complex number per (position, pair), in float32
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))  # [hd/2]
    if config.rope_scaling is not None:  # Llama 3.1: long wavelengths divided by the factor, short ones kept
        freqs = scale_frequencies(freqs, config.rope_scaling)
    positions = torch.arange(start_pos, K).float()  # [T]: a decoded token sits after everything cached
    if attention_mask is not None:  # a padded batch: each sequence counts its own real tokens only
        positions = (attention_mask.cpu().cumsum(-1) - 1).clamp(min=0)[:, start_pos:K].float()  # [B, T]
    angles = positions[..., None] * freqs  # [T, hd/2] ([B, T, hd/2])
    freqs_cis = torch.polar(torch.ones_like(angles), angles).to(device)  # [T, hd/2]
    mask = torch.triu(torch.full((T, K), float("-inf"), device=device), diagonal=start_pos + 1)  # [T, K]
    if attention_mask is not None:  # pad keys masked; the dtype's min, not -inf: a pad query's row stays finite
        pad = attention_mask[:, None, :K].to(device) == 0  # [B, 1, K]
        mask = mask + torch.where(pad, torch.finfo(torch.float32).min, 0.0)  # [B, T, K]

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
        heads = []
        for head in range(config.n_heads):
            kv = head // (config.n_heads // config.n_kv_heads)  # grouped-query attention: the notebook's head // 4
            q, k, v = x_norm @ wq[head].T, x_norm @ wk[kv].T, x_norm @ wv[kv].T  # [T, hd] each
            q_rotated = rotate(q, freqs_cis)  # [T, hd] float32
            k_rotated = rotate(k, freqs_cis)  # [T, hd] float32
            keys, values = k_rotated, v
            if cache is not None:  # KV cache: this KV head's rotated keys and values of every position so far
                if head % (config.n_heads // config.n_kv_heads) == 0:  # the group's first head appends, once
                    past_k = cache.get(f"{p}k{kv}", k_rotated[..., :0, :])
                    past_v = cache.get(f"{p}v{kv}", v[..., :0, :])
                    cache[f"{p}k{kv}"] = torch.cat([past_k, k_rotated], dim=-2)
                    cache[f"{p}v{kv}"] = torch.cat([past_v, v], dim=-2)
                keys, values = cache[f"{p}k{kv}"], cache[f"{p}v{kv}"]  # [K, hd]
            scores = q_rotated @ keys.transpose(-2, -1) / hd**0.5  # [T, K]
            probs = torch.softmax(scores + mask, dim=-1).to(dtype)  # [T, K], over keys
            output = probs @ values  # [T, hd]
            h = f"{p}attention.heads.{head}."
            cached = dict(cache_k=keys, cache_v=values) if cache is not None else {}
            for name, value in dict(
                q=q,
                k=k,
                v=v,
                q_rotated=q_rotated,
                k_rotated=k_rotated,
                **cached,
                scores=scores,
                probs=probs,
                output=output,
            ).items():
                harness.record(h + name, value)
            heads.append(output)
        attention = torch.cat(heads, dim=-1) @ weight(p + "attention.wo.weight").T  # [T, D]
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
    """Interleaved pairs as complex numbers, times freqs_cis. [T, hd] -> [T, hd] float32."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [T, hd/2]
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
