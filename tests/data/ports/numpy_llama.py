"""A Llama-3 forward in NumPy, written as a port to another runtime is: Hugging Face's weight layout (q/k rows permuted
for rotate_half), names of its own, its intermediates in one .npz (numpy_llama.toml maps them; tests/test_dump.py).

`python numpy_llama.py CHECKPOINT OUT.npz`: the default prompt, float32. Shapes: T tokens, H heads, KV kv heads.
"""

from __future__ import annotations

import sys

import numpy as np

from harness.checkpoint import open_checkpoint
from harness.run import prompt_tokens


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def to_half_split(w: np.ndarray, n: int) -> np.ndarray:
    """wq/wk rows, Meta's interleaved pairs -> Hugging Face's halves (convert_llama_weights_to_hf.py's permute)."""
    d1, d2 = w.shape
    return w.reshape(n, d1 // n // 2, 2, d2).transpose(0, 2, 1, 3).reshape(d1, d2)


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin  # rotate_half


def forward(checkpoint: str, dump: dict[str, np.ndarray]) -> np.ndarray:
    ckpt = open_checkpoint(checkpoint)
    c = ckpt.config
    assert c.rope_scaling is None, "this port has no scaled RoPE (Llama 3.0 only)"
    weight = lambda name: ckpt.tensor(name).float().numpy()  # noqa: E731
    tokens = np.array(prompt_tokens(ckpt))
    T, H, KV, hd = len(tokens), c.n_heads, c.n_kv_heads, c.head_dim
    angles = np.outer(np.arange(T), c.rope_theta ** -(np.arange(0, hd, 2) / hd))  # [T, hd / 2], float64
    cos, sin = (f(np.concatenate([angles, angles], -1)).astype(np.float32) for f in (np.cos, np.sin))  # [T, hd]
    causal = np.triu(np.full((T, T), -np.inf, np.float32), 1)
    x = weight("tok_embeddings.weight")[tokens]  # [T, dim]
    dump |= {"input_ids": tokens, "embed": x}
    for layer in range(c.n_layers):
        w = lambda name: weight(f"layers.{layer}.{name}.weight")  # noqa: E731
        out = lambda name, value: dump.__setitem__(f"blk.{layer}.{name}", value)  # noqa: E731
        h = rms_norm(x, w("attention_norm"), c.norm_eps)
        q = (h @ to_half_split(w("attention.wq"), H).T).reshape(T, H, hd).transpose(1, 0, 2)  # [H, T, hd]
        k = (h @ to_half_split(w("attention.wk"), KV).T).reshape(T, KV, hd).transpose(1, 0, 2)  # [KV, T, hd]
        v = (h @ w("attention.wv").T).reshape(T, KV, hd).transpose(1, 0, 2)  # [KV, T, hd]
        q_rope, k_rope = rotate(q, cos, sin), rotate(k, cos, sin)
        kq = q_rope @ np.repeat(k_rope, H // KV, 0).transpose(0, 2, 1) / np.float32(np.sqrt(hd))  # [H, T, T]
        e = np.exp(kq + causal - (kq + causal).max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
        kqv = probs @ np.repeat(v, H // KV, 0)  # [H, T, hd]
        attn_out = kqv.transpose(1, 0, 2).reshape(T, H * hd) @ w("attention.wo").T  # [T, dim]
        ffn_inp = x + attn_out
        f = rms_norm(ffn_inp, w("ffn_norm"), c.norm_eps)
        gate, up = f @ w("feed_forward.w1").T, f @ w("feed_forward.w3").T  # [T, ffn_dim]
        hidden = gate / (1 + np.exp(-gate)) * up  # silu(gate) * up
        ffn_out = hidden @ w("feed_forward.w2").T
        x = ffn_inp + ffn_out
        for name, value in dict(attn_norm=h, q=q, k=k, v=v, q_rope=q_rope, k_rope=k_rope, kq=kq).items():
            out(name, value)
        for name, value in dict(kq_softmax=probs, kqv=kqv, attn_out=attn_out, ffn_inp=ffn_inp, ffn_norm=f).items():
            out(name, value)
        for name, value in dict(ffn_gate=gate, ffn_up=up, ffn_hidden=hidden, ffn_out=ffn_out, l_out=x).items():
            out(name, value)
    norm = rms_norm(x, weight("norm.weight"), c.norm_eps)
    output = "tok_embeddings.weight" if c.tie_word_embeddings else "output.weight"
    dump |= {"output_norm": norm, "result_output": norm @ weight(output).T}
    return dump["result_output"]


if __name__ == "__main__":
    dump: dict[str, np.ndarray] = {}
    forward(sys.argv[1], dump)
    np.savez(sys.argv[2], **dump)
