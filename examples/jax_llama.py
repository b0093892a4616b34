"""A Llama-3 forward in JAX (jax.numpy), written as a port to another runtime is: Hugging Face's q/k layout
(rotate_half), a batch axis, names of its own, its intermediates in an .npz that jax_llama.toml maps (docs/ports.md).

`python jax_llama.py CHECKPOINT --dtype bfloat16 --out dump.npz`, then judge the dump (the command it prints):
`python -m harness verify CHECKPOINT --dtype bfloat16 --impl 'dump:dump.npz?map=jax_llama.toml'`.
Shapes: B batch (1), T tokens, D dim, H heads, KV kv heads, hd head_dim, F ffn_dim, V vocab.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from harness import HarnessError, prompt_tokens
from harness.checkpoint import open_checkpoint
from harness.config import ModelConfig
from harness.hf_layout import heads_of, permute_to_hf
from harness.run import DEFAULT_PROMPT

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LAYER_WEIGHTS = ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo", "ffn_norm"]
LAYER_WEIGHTS += ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w  # [B, T, D]


def rope_frequencies(c: ModelConfig) -> jax.Array:
    """One frequency per pair of dimensions [hd/2], float32; Llama 3.1's scaling when the config has it."""
    half = c.head_dim // 2
    freqs = 1.0 / (c.rope_theta ** (jnp.arange(half, dtype=jnp.float32) / half))  # [hd/2]
    s = c.rope_scaling
    if s is None:
        return freqs
    wavelen = 2 * math.pi / freqs  # [hd/2]
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    scaled = jnp.where(wavelen > low_freq_wavelen, freqs / s.factor, freqs)  # long wavelengths slowed down
    mixed = (1 - smooth) * freqs / s.factor + smooth * freqs  # in between: a smooth mix of the two
    return jnp.where((wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen), mixed, scaled)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)  # Hugging Face's layout: pair i is (x[i], x[i + hd/2])
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)  # [B, T, n, hd]: rotated in float32, as the notebook
    return x * cos[:, None] + rotate_half(x) * sin[:, None]  # cos, sin [T, hd] -> [T, 1, hd]


def attention(x: jax.Array, w: dict, cos: jax.Array, sin: jax.Array, c: ModelConfig) -> tuple[jax.Array, dict]:
    """Every head at once. x [B, T, D] normalised -> ([B, T, D], the intermediates)."""
    B, T, _ = x.shape
    H, KV, hd = c.n_heads, c.n_kv_heads, c.head_dim
    q = (x @ w["attention.wq"].T).reshape(B, T, H, hd)  # [B, T, H, hd]
    k = (x @ w["attention.wk"].T).reshape(B, T, KV, hd)  # [B, T, KV, hd]
    v = (x @ w["attention.wv"].T).reshape(B, T, KV, hd)  # [B, T, KV, hd]
    q_rope, k_rope = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # float32
    keys = jnp.repeat(k_rope, H // KV, axis=2)  # [B, T, H, hd]: grouped-query attention, KV head h // (H / KV)
    values = jnp.repeat(v, H // KV, axis=2)  # [B, T, H, hd]
    logits = jnp.einsum("bthd,bshd->bhts", q_rope, keys) / math.sqrt(hd)  # [B, H, T, T] float32
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))  # [T, T]: each token sees itself and those before
    weights = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1).astype(x.dtype)  # [B, H, T, T]
    encoded = jnp.einsum("bhts,bshd->bthd", weights, values)  # [B, T, H, hd]
    out = encoded.reshape(B, T, H * hd) @ w["attention.wo"].T  # [B, T, D]
    taps = dict(q=q, k=k, v=v, q_rope=q_rope, k_rope=k_rope, logits=logits, weights=weights, encoded=encoded, out=out)
    return out, {f"attn.{name}": value for name, value in taps.items()}


def layer(x: jax.Array, w: dict, cos: jax.Array, sin: jax.Array, config: ModelConfig) -> tuple[jax.Array, dict]:
    """One decoder layer, x [B, T, D] -> ([B, T, D], its intermediates): returned, not stored, so it can be jitted."""
    h = rms_norm(x, w["attention_norm"], config.norm_eps)
    attn_out, taps = attention(h, w, cos, sin, config)
    residual = x + attn_out  # [B, T, D]
    f = rms_norm(residual, w["ffn_norm"], config.norm_eps)
    gate, up = f @ w["feed_forward.w1"].T, f @ w["feed_forward.w3"].T  # [B, T, F]
    hidden = jax.nn.silu(gate) * up  # SwiGLU
    mlp_out = hidden @ w["feed_forward.w2"].T  # [B, T, D]
    out = residual + mlp_out
    mlp = {"mlp.gate": gate, "mlp.up": up, "mlp.hidden": hidden, "mlp.out": mlp_out}
    return out, {"pre_attention_norm": h, **taps, "post_attention": residual, "pre_mlp_norm": f, **mlp, "out": out}


def forward(checkpoint: str | Path, tokens: list[int], dtype: str = "float32", jit: bool = False) -> dict:
    """The logits of `tokens` and every intermediate, by the port's names -> float32 numpy arrays (tokens: integers)."""
    ckpt = open_checkpoint(checkpoint)  # Meta's layout; q/k rows permuted below to Hugging Face's
    c, dt = ckpt.config, DTYPES[dtype]

    def weight(name: str) -> jax.Array:
        w = ckpt.tensor(name).float()  # torch, Meta's layout
        if heads := heads_of(name):  # wq, wk: each head's rows in Hugging Face's half-split order (rotate_half)
            w = permute_to_hf(w, getattr(c, heads))
        return jnp.asarray(w.numpy(), dt)

    T = len(tokens)
    angles = jnp.outer(jnp.arange(T, dtype=jnp.float32), rope_frequencies(c))  # [T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [T, hd]: both halves of a pair turn alike
    cos, sin = jnp.cos(angles), jnp.sin(angles)  # [T, hd] float32
    run_layer = jax.jit(layer, static_argnames="config") if jit else layer
    ids = jnp.asarray([tokens])  # [B, T]
    x = weight("tok_embeddings.weight")[ids]  # [B, T, D]
    dump = {"token_ids": ids, "embed": x}
    for i in range(c.n_layers):
        w = {name: weight(f"layers.{i}.{name}.weight") for name in LAYER_WEIGHTS}
        x, taps = run_layer(x, w, cos, sin, config=c)
        dump |= {f"layer_{i}.{name}": value for name, value in taps.items()}
    x = rms_norm(x, weight("norm.weight"), c.norm_eps)  # [B, T, D]
    logits = x @ weight("tok_embeddings.weight" if c.tie_word_embeddings else "output.weight").T  # [B, T, V]
    dump |= {"final_norm": x, "logits": logits}
    float32 = lambda v: v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v  # bfloat16: exact
    return {name: np.asarray(float32(v)) for name, v in dump.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run the JAX Llama-3 and write its intermediates to an .npz.")
    p.add_argument("checkpoint", help="a checkpoint folder (Meta's or Hugging Face's format)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text after <|begin_of_text|> (default: verify's)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="what the forward computes in")
    p.add_argument("--jit", action="store_true", help="compile each layer with jax.jit")
    p.add_argument("--out", required=True, help="the .npz to write (bfloat16 values as float32, exact)")
    args = p.parse_args(argv)
    try:
        dump = forward(args.checkpoint, prompt_tokens(args.checkpoint, args.prompt), args.dtype, args.jit)
    except HarnessError as e:  # a checkpoint that is not one, a prompt too long: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    np.savez(args.out, **dump)
    impl = f"dump:{args.out}?map={Path(__file__).with_suffix('.toml')}"
    prompt = [] if args.prompt == DEFAULT_PROMPT else ["--prompt", args.prompt]
    verify = ["python", "-m", "harness", "verify", args.checkpoint, "--dtype", args.dtype, "--impl", impl, *prompt]
    print(f"wrote {len(dump)} arrays ({args.dtype}, {dump['token_ids'].shape[1]} tokens) to {args.out}; judge them:")
    print(shlex.join(verify))


if __name__ == "__main__":
    main()
