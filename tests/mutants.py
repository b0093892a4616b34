"""The mutant catalogue: known hand-written-Llama bugs, each one small function of harness/scratch.py replaced.

FORWARD: bugs of one forward pass (tests/test_mutations.py, test_sensitivity.py, test_verdicts.py); CACHE: KV-cache bugs
of a generation (tests/test_generation.py); LONG_CONTEXT: RoPE bugs a short prompt hides (tests/test_long_context.py).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from harness import scratch
from harness.config import rope_frequencies
from harness.recording import record


@dataclass(frozen=True)
class Mutant:
    """One bug: `scratch.<target>` replaced by `make(original, config)` for a run."""

    id: str
    bug: str
    first: str  # the name (a generation: the step's name) where the bug sits, on the checkpoint its tests use
    target: str  # the function of harness/scratch.py replaced
    make: Callable  # make(original, config) -> replacement

    def apply(self, monkeypatch, config) -> None:
        """Replace the target for the rest of the test (or of a `pytest.MonkeyPatch.context()` block)."""
        monkeypatch.setattr(scratch, self.target, self.make(getattr(scratch, self.target), config))


def by_id(catalogue: list[Mutant], mutant_id: str) -> Mutant:
    return next(m for m in catalogue if m.id == mutant_id)


HEAD0 = "layers.0.attention.heads.0"

# ---- FORWARD: one forward pass, on tiny 3.0 (8 heads, 2 KV heads) ----------------------------------------------------


def _layer_with(*, attention_residual_from_norm: bool = False, ffn_residual: bool = True):
    """scratch.transformer_layer with one line changed (the rest as in harness/scratch.py)."""

    def make(original, config):
        def layer(layer, x, weights, config, freqs_cis, mask):
            x_norm = scratch.rms_norm(x, weights["attention_norm"], config.norm_eps)
            record(f"layers.{layer}.attention_norm", x_norm)
            attention_output = scratch.attention(layer, x_norm, weights, config, freqs_cis, mask)
            record(f"layers.{layer}.attention.output", attention_output)
            attention_residual = (x_norm if attention_residual_from_norm else x) + attention_output  # bug: x_norm
            record(f"layers.{layer}.attention_residual", attention_residual)
            h_norm = scratch.rms_norm(attention_residual, weights["ffn_norm"], config.norm_eps)
            record(f"layers.{layer}.ffn_norm", h_norm)
            ffn = scratch.feed_forward(layer, h_norm, weights)
            output = attention_residual + ffn if ffn_residual else ffn  # bug: residual dropped
            record(f"layers.{layer}.output", output)
            return output

        return layer

    return make


def _weights_with(change: Callable[[dict], None]):
    def make(original, config):
        def layer_weights(ckpt, layer, dtype, device):
            w = original(ckpt, layer, dtype, device)
            change(w)
            return w

        return layer_weights

    return make


def _rotate_halves(original, config):
    """HF's rotate_half pairing (i, i + hd/2) applied to Meta's interleaved q/k rows, without the permutation."""

    def rotate(x, freqs_cis):
        half = x.shape[-1] // 2
        interleaved = torch.stack([x[..., :half], x[..., half:]], -1).flatten(-2)  # [T, hd]: pairs (i, i + hd/2)
        out = original(interleaved, freqs_cis).unflatten(-1, (half, 2))  # [T, hd/2, 2]
        return torch.cat([out[..., 0], out[..., 1]], -1)  # [T, hd]

    return rotate


def _skip_final_norm(original, config):
    calls = itertools.count()

    def rms_norm(x, weight, eps):  # 2 calls per layer, then the final norm
        return x if next(calls) == 2 * config.n_layers else original(x, weight, eps)

    return rms_norm


def _swap(w: dict, a: str, b: str) -> None:
    w[a], w[b] = w[b], w[a]


FORWARD = [
    Mutant(
        "rope_theta",
        "rope_theta 10000 (Llama 2's) instead of the checkpoint's 500000",
        f"{HEAD0}.q_rotated",
        "rope_freqs_cis",
        lambda f, c: lambda cfg, n, dt, dev: f(dataclasses.replace(cfg, rope_theta=10000.0), n, dt, dev),
    ),
    Mutant(
        "positions_from_1",
        "RoPE positions start at 1",
        f"{HEAD0}.q_rotated",
        "rope_freqs_cis",
        lambda f, c: lambda cfg, n, dt, dev: f(cfg, n + 1, dt, dev)[1:],
    ),
    Mutant(
        "rotate_half",
        "rotate_half pairing on Meta's interleaved layout",
        f"{HEAD0}.q_rotated",
        "rotate",
        _rotate_halves,
    ),
    Mutant(
        "gqa_modulo",
        "GQA: query head h reads KV head h % n_kv instead of h // n_rep",
        "layers.0.attention.heads.1.k",
        "kv_head_of",
        lambda f, c: lambda h, cfg: h % cfg.n_kv_heads,
    ),
    Mutant(
        "scale_sqrt_dim",
        "scores divided by sqrt(dim) instead of sqrt(head_dim)",
        f"{HEAD0}.scores",
        "score_scale",
        lambda f, c: lambda cfg: cfg.dim**0.5,
    ),
    Mutant(
        "mask_diagonal_0",
        "causal mask triu(diagonal=0): a token cannot see itself",
        f"{HEAD0}.probs",
        "causal_mask",
        lambda f, c: lambda n, dt, dev: torch.triu(torch.full((n, n), float("-inf"), dtype=dt, device=dev), 0),
    ),
    Mutant(
        "no_mask",
        "no causal mask",
        f"{HEAD0}.probs",
        "causal_mask",
        lambda f, c: lambda n, dt, dev: torch.zeros(n, n, dtype=dt, device=dev),
    ),
    Mutant(
        "softmax_dim0",
        "softmax over queries (dim 0) instead of keys",
        f"{HEAD0}.probs",
        "softmax",
        lambda f, c: lambda s: torch.nn.functional.softmax(s, dim=0),
    ),
    Mutant(
        "norm_weight_dropped",
        "RMSNorm without its weight",
        "layers.0.attention_norm",
        "rms_norm",
        lambda f, c: lambda x, w, eps: f(x, torch.ones_like(w), eps),
    ),
    Mutant(
        "norm_over_tokens",
        "RMSNorm mean over tokens (dim 0) instead of features",
        "layers.0.attention_norm",
        "rms_norm",
        lambda f, c: lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + eps) * w,
    ),
    Mutant(
        "residual_from_norm",
        "attention residual added to the normed input",
        "layers.0.attention_residual",
        "transformer_layer",
        _layer_with(attention_residual_from_norm=True),
    ),
    Mutant(
        "ffn_residual_dropped",
        "no residual around the feed-forward",
        "layers.0.output",
        "transformer_layer",
        _layer_with(ffn_residual=False),
    ),
    Mutant(
        "wo_transposed",
        "output projection applied as wo instead of wo.T",
        "layers.0.attention.output",
        "layer_weights",
        _weights_with(lambda w: w.update({"attention.wo": w["attention.wo"].T})),
    ),
    Mutant(
        "wo_skipped",
        "output projection not applied (heads concatenated only)",
        "layers.0.attention.output",
        "layer_weights",
        _weights_with(
            lambda w: w.update({"attention.wo": torch.eye(w["attention.wo"].shape[0], dtype=w["attention.wo"].dtype)})
        ),
    ),
    Mutant(
        "silu_on_up",
        "SwiGLU: silu applied to up (w3) instead of gate (w1)",
        "layers.0.feed_forward.hidden",
        "swiglu",
        lambda f, c: lambda gate, up: gate * torch.nn.functional.silu(up),
    ),
    Mutant(
        "gelu",
        "GELU instead of SiLU in the gate",
        "layers.0.feed_forward.hidden",
        "swiglu",
        lambda f, c: lambda gate, up: torch.nn.functional.gelu(gate) * up,
    ),
    Mutant(
        "w1_w3_swapped",
        "w1 and w3 swapped",
        "layers.0.feed_forward.gate",
        "layer_weights",
        _weights_with(lambda w: _swap(w, "feed_forward.w1", "feed_forward.w3")),
    ),
    Mutant(
        "previous_layer_weights",
        "layer l reads layer l-1's weights (off by one)",
        "layers.1.attention_norm",
        "layer_weights",
        lambda f, c: lambda ckpt, layer, dt, dev: f(ckpt, max(layer - 1, 0), dt, dev),
    ),
    Mutant(
        "final_norm_skipped", "final RMSNorm skipped before the output projection", "norm", "rms_norm", _skip_final_norm
    ),
]

# ---- CACHE: a generation's KV cache, on tiny 3.0; `first` is the step's name --------------------------------------


def _appending(change: Callable):
    """append_to_cache with the cache tensors the step leaves behind changed: change(past, new, start_pos) -> stored."""

    def make(original, config):
        def append_to_cache(cache, layer, keys, values, start_pos):
            for name, new in ((f"layers.{layer}.k", keys), (f"layers.{layer}.v", values)):
                past = cache.get(name, new[:, :0])[:, :start_pos]  # [KV, start_pos, hd]
                cache[name] = change(past, new, start_pos)
            return cache[f"layers.{layer}.k"], cache[f"layers.{layer}.v"]

        return append_to_cache

    return make


def _off_by_one(past, new, start_pos):
    """Meta's preallocated cache written one slot early: the step's key over position start_pos - 1, start_pos empty."""
    if start_pos == 0:
        return torch.cat([past, new], dim=1)
    return torch.cat([past[:, :-1], new, torch.zeros_like(new)], dim=1)


def _unrotated(original, config):
    def new_keys_values(x_norm, weights, config, freqs_cis):
        T, hd = x_norm.shape[0], config.head_dim
        k = (x_norm @ weights["attention.wk"].T).view(T, config.n_kv_heads, hd).transpose(0, 1)  # before RoPE
        return k.float(), original(x_norm, weights, config, freqs_cis)[1]

    return new_keys_values


def _prefill_not_cached(original, config):
    def append_to_cache(cache, layer, keys, values, start_pos):
        if start_pos == 0:  # the prefill attends over its own keys but leaves the cache empty
            original({}, layer, keys, values, start_pos)
            cache[f"layers.{layer}.k"], cache[f"layers.{layer}.v"] = keys[:, :0], values[:, :0]
            return keys, values
        return original(cache, layer, keys, values, start_pos)

    return append_to_cache


CACHE = [
    Mutant(
        "positions_restart",
        "decode positions restart at 0 (RoPE of position 0 for every decoded token)",
        f"steps.1.{HEAD0}.q_rotated",
        "step_freqs_cis",
        lambda f, c: lambda cfg, start, n, dt, dev: f(cfg, 0, n, dt, dev),
    ),
    Mutant(
        "cache_not_appended",
        "decode steps do not append their keys and values to the cache",
        f"steps.1.{HEAD0}.cache_k",
        "append_to_cache",
        _appending(lambda past, new, s: past if s else new),
    ),
    Mutant(
        "cache_appended_twice",
        "decode steps append their keys and values twice",
        f"steps.1.{HEAD0}.cache_k",
        "append_to_cache",
        _appending(lambda past, new, s: torch.cat([past, new, new] if s else [past, new], dim=1)),
    ),
    Mutant(
        "cache_off_by_one",
        "cache written at start_pos - 1 (over the previous token's key), start_pos left empty",
        f"steps.1.{HEAD0}.cache_k",
        "append_to_cache",
        _appending(_off_by_one),
    ),
    Mutant(
        "decode_query_masked",
        "the prefill's causal mask triu(diagonal=1) applied to the single decode query",
        f"steps.1.{HEAD0}.probs",
        "step_mask",
        lambda f, c: (
            lambda n, start, dt, dev: torch.triu(torch.full((n, start + n), float("-inf"), dtype=dt, device=dev), 1)
        ),
    ),
    Mutant(
        "keys_cached_unrotated",
        "keys cached before RoPE and attended unrotated",
        f"steps.0.{HEAD0}.cache_k",
        "new_keys_values",
        _unrotated,
    ),
    Mutant(
        "prefill_skipped",
        "the prompt never reaches the cache (the notebook thread's missing prefill)",
        f"steps.1.{HEAD0}.cache_k",
        "append_to_cache",
        _prefill_not_cached,
    ),
]

# ---- LONG_CONTEXT: RoPE bugs caught at ~4100 tokens in bfloat16, on tiny 3.1 (factor 8, head_dim 16) ---------------


def _frequencies(change):
    """scratch.rope_frequencies of a config changed by `change` (the checkpoint itself says otherwise)."""
    return lambda original, config: lambda cfg: rope_frequencies(change(cfg))


def _angles_in(dtype: torch.dtype):
    """The notebook's freqs_cis with position x frequency computed in `dtype` (a low-precision angle at position p
    is off by about p x frequency x u: radians at thousands of tokens)."""

    def make(original, config):
        def rope_freqs_cis(config, n_tokens, _dtype, device):
            freqs = rope_frequencies(config).to(dtype)  # [hd/2]
            angles = torch.outer(torch.arange(n_tokens, dtype=dtype), freqs).float()  # [T, hd/2], rounded to dtype
            return torch.polar(torch.ones_like(angles), angles).to(device)

        return rope_freqs_cis

    return make


def _factor(factor: float):
    return lambda c: dataclasses.replace(c, rope_scaling=dataclasses.replace(c.rope_scaling, factor=factor))


Q0 = f"{HEAD0}.q_rotated"
LONG_CONTEXT = [
    Mutant(
        "rope_scaling_missing",
        "Llama 3.1's RoPE scaling left out",
        Q0,
        "rope_frequencies",
        _frequencies(lambda c: dataclasses.replace(c, rope_scaling=None)),
    ),
    Mutant("rope_factor_32_for_8", "RoPE scaling factor 32 for 8", Q0, "rope_frequencies", _frequencies(_factor(32.0))),
    Mutant(
        "rope_angles_bfloat16", "RoPE angles computed in bfloat16", Q0, "rope_freqs_cis", _angles_in(torch.bfloat16)
    ),
    Mutant("rope_angles_float16", "RoPE angles computed in float16", Q0, "rope_freqs_cis", _angles_in(torch.float16)),
    Mutant(
        "rope_theta_10000",
        "rope_theta 10000 (Llama 2's)",
        Q0,
        "rope_frequencies",
        _frequencies(lambda c: dataclasses.replace(c, rope_theta=10000.0)),
    ),
]


# ---- BATCH: padded batches (harness/batch.py), on tiny 3.0, sequence 0 the shortest (tests/test_batch.py) ------------


def _positions_from_columns(decode_only: bool):
    """scratch.batch_positions counting the padded columns, not each sequence's real tokens (always, or in decode steps
    only)."""

    def make(original, config):
        def positions(attention_mask, start_pos, n_tokens):
            if decode_only and start_pos == 0:
                return original(attention_mask, start_pos, n_tokens)
            columns = torch.arange(start_pos, start_pos + n_tokens)  # bug: the column index is the position
            return columns.expand(attention_mask.shape[0], n_tokens)  # [B, T]

        return positions

    return make


def _causal_only(in_decode_only: bool):
    """scratch.padding_mask without the padding: pad keys attended (always, or in decode steps only)."""

    def make(original, config):
        def mask(attention_mask, start_pos, n_tokens, dtype, device):
            if in_decode_only and start_pos == 0:
                return original(attention_mask, start_pos, n_tokens, dtype, device)
            causal = scratch.step_mask(n_tokens, start_pos, dtype, device)  # [T, K]; bug: no pad key masked
            return causal.expand(attention_mask.shape[0], n_tokens, start_pos + n_tokens)

        return mask

    return make


def _mask_on_queries(original, config):
    """scratch.padding_mask applied to the padded queries' rows instead of the pad keys' columns."""

    def mask(attention_mask, start_pos, n_tokens, dtype, device):
        n_keys = start_pos + n_tokens
        causal = scratch.step_mask(n_tokens, start_pos, dtype, device)  # [T, K]
        pad_query = attention_mask[:, start_pos:n_keys, None] == 0  # [B, T, 1]; bug: the query axis
        own = torch.arange(n_keys)[None, :] == torch.arange(start_pos, n_keys)[:, None]  # [T, K]
        return torch.where(pad_query & ~own, float("-inf"), causal)  # [B, T, K]

    return mask


@dataclass(frozen=True)
class BatchMutant(Mutant):
    padding: str = "left"
    generate: int = 0


BATCH = [
    BatchMutant(
        "left-positions-not-offset",
        "left padding: RoPE positions counted from the padded column, not from each sequence's first real token",
        f"batch.0.{HEAD0}.q_rotated",
        "batch_positions",
        _positions_from_columns(decode_only=False),
    ),
    BatchMutant(
        "pad-keys-attended",
        "the padding mask dropped: every query attends to the pad keys before it",
        f"batch.0.{HEAD0}.probs",
        "padding_mask",
        _causal_only(in_decode_only=False),
    ),
    BatchMutant(
        "mask-on-queries",
        "the padding mask applied to the pad queries' rows instead of the pad keys' columns",
        f"batch.0.{HEAD0}.probs",
        "padding_mask",
        _mask_on_queries,
    ),
    BatchMutant(
        "decode-mask-ignored",
        "the padding mask ignored in a decode step: the new token attends to the pads",
        f"batch.0.steps.1.{HEAD0}.probs",
        "padding_mask",
        _causal_only(in_decode_only=True),
        generate=1,
    ),
    BatchMutant(
        "right-decode-from-last-column",
        "right padding: a decoded token placed after the last column (the padded width) instead of after the "
        "sequence's last real token, so its RoPE position counts the pads",
        f"batch.0.steps.1.{HEAD0}.q_rotated",
        "batch_positions",
        _positions_from_columns(decode_only=True),
        padding="right",
        generate=1,
    ),
]
