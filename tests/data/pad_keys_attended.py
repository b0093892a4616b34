"""The scratch forward with a batching bug: the padding mask dropped, so every query attends to the pad keys before it
(tests/test_batch.py runs the plugin's suite on it with a left-padded batch)."""

import torch

from harness import scratch


def forward(checkpoint, tokens, *, dtype, device, attention_mask=None, start_pos=0, cache=None):
    config = checkpoint.config
    if attention_mask is None:
        return scratch.forward(checkpoint, tokens, dtype=dtype, device=device, start_pos=start_pos, cache=cache)
    n_tokens = tokens.shape[-1]
    ids = torch.as_tensor(tokens).flatten()
    x = checkpoint.take("tok_embeddings.weight", ids).view(*tokens.shape, -1).to(device=device, dtype=dtype)
    scratch.record("embeddings", x)
    positions = scratch.batch_positions(attention_mask, start_pos, n_tokens)  # [B, T]
    freqs_cis = scratch.batch_freqs_cis(config, positions, dtype, device)  # [B, T, hd/2]
    mask = scratch.step_mask(n_tokens, start_pos, scratch.upcast(dtype), device)  # [T, K]: bug, no pad key masked
    for layer in range(config.n_layers):
        weights = scratch.layer_weights(checkpoint, layer, dtype, device)
        x = scratch.transformer_layer(layer, x, weights, config, freqs_cis, mask)
    norm = scratch.rms_norm(x, checkpoint.tensor("norm.weight").to(device=device, dtype=dtype), config.norm_eps)
    scratch.record("norm", norm)
    return scratch.output_logits(checkpoint, norm)  # [B, T, V]
