"""GGUF files for the tests, written as llama.cpp's converter writes a Llama: its tensor names, HF's q/k rows through
its `LlamaModel.permute`, vectors in F32, matrices in the type asked for (gguf-py's quantizers, and a Q4_K packer here).

`write_gguf(ckpt, path, "Q8_0")`; `python tests/gguf_files.py CKPT OUT.gguf Q8_0` from a shell (docs/quantized.md).
Not llama.cpp's own converter (`python -m harness gguf`): no tokenizer in the file, so llama.cpp cannot load these.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from harness.checkpoint import Checkpoint, open_checkpoint
from harness.gguf_weights import gguf_name
from harness.hf_layout import heads_of
from harness.weights import hf_tensor

# A tiny whose every matrix has 256-multiple columns (dim 256, FFN 768), so that Q4_K's 256-value blocks fit it: the
# tiny variants' 128 and 96 do not (llama.cpp would fall back to Q5_0 for them). For harness.tiny.make_tiny_meta.
Q4K_PARAMS = dict(n_layers=2, dim=256, n_heads=4, n_kv_heads=2, multiple_of=256, norm_eps=1e-5, rope_theta=500000.0)


def llama_cpp_permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute` (vendor/llama.cpp/conversion/llama.py), applied to HF's q/k rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """float32 [R, C] (C a multiple of 256) -> Q4_K blocks, bytes [R, C / 256 * 144]: per super-block of 256, fp16 d and
    dmin, eight 6-bit scales and mins (one per 32 values) packed in 12 bytes as ggml's get_scale_min_k4 unpacks them,
    128 bytes of 4-bit quants (x ~ d * sc * q - dmin * m). A plain min-max packer, not llama.cpp's make_qkx2_quants
    search: the same format, somewhat larger errors."""
    n_rows, n_cols = rows.shape
    x = rows.reshape(-1, 8, 32).astype(np.float32)  # [B, 8 sub-blocks, 32]
    low = np.minimum(x.min(-1), 0)  # [B, 8]: Q4_K's offsets only subtract
    step = (x.max(-1) - low) / 15  # [B, 8]
    d = (step.max(-1) / 63).astype(np.float16)  # [B]
    dmin = (-low.min(-1) / 63).astype(np.float16)  # [B]
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.clip(np.round(step / d32), 0, 63), 0).astype(np.uint8)  # [B, 8]
        mn = np.where(dmin32 > 0, np.clip(np.round(-low / dmin32), 0, 63), 0).astype(np.uint8)  # [B, 8]
        scale = (d32 * sc)[..., None]  # [B, 8, 1]
        q = np.where(scale > 0, np.round((x + (dmin32 * mn)[..., None]) / scale), 0)
    q = np.clip(q, 0, 15).astype(np.uint8)  # [B, 8, 32]
    packed = np.empty((len(x), 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    nibbles = q.reshape(-1, 4, 2, 32)  # pairs of sub-blocks: low nibble the first, high the second
    qs = (nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qs], 1)
    return blocks.reshape(n_rows, n_cols // 256 * 144)


def _encoded(data: np.ndarray, kind: str) -> tuple[np.ndarray, object]:
    """(what GGUFWriter.add_tensor takes, its raw_dtype) for float32 `data` stored as `kind`."""
    import gguf

    if kind == "F32":
        return data, None
    if kind == "F16":
        return data.astype(np.float16), None
    if kind == "Q4_K":  # a block of rows at a time: the packer's float32 temporaries are several times the block
        blocks = [quantize_q4_k(data[i : i + 4096]) for i in range(0, len(data), 4096)]
        return np.concatenate(blocks), gguf.GGMLQuantizationType.Q4_K
    qtype = gguf.GGMLQuantizationType[kind]
    return gguf.quants.quantize(data, qtype), qtype


def write_gguf(
    ckpt: Checkpoint | str | Path,
    path: str | Path,
    kind: str = "Q8_0",
    *,
    skip: tuple[str, ...] = (),
    hparams: bool = True,
    file_type: int | None = None,
    change: Callable[[str, np.ndarray], tuple[np.ndarray, object]] | None = None,
) -> Path:
    """`ckpt`'s weights as a GGUF at `path`, matrices as `kind` (F32, F16, BF16, Q8_0, Q4_0, Q5_0, ..., Q4_K).
    `skip`: Meta names left out; `hparams`: write llama.* hyperparameters; `change(gguf_name, data)`: the (bytes,
    raw_dtype) to write for a tensor instead, or None to keep it (bad files for the tests); `file_type`:
    general.file_type (llama.cpp's LlamaFileType: 7 Q8_0, 15 Q4_K_M), none by default."""
    import gguf

    ckpt = ckpt if isinstance(ckpt, Checkpoint) else open_checkpoint(ckpt)
    c = ckpt.config
    writer = gguf.GGUFWriter(str(path), "llama")
    if hparams:
        writer.add_block_count(c.n_layers)
        writer.add_context_length(c.max_seq_len)
        writer.add_embedding_length(c.dim)
        writer.add_feed_forward_length(c.ffn_dim)
        writer.add_head_count(c.n_heads)
        writer.add_head_count_kv(c.n_kv_heads)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_layer_norm_rms_eps(c.norm_eps)
        writer.add_rope_dimension_count(c.head_dim)
        writer.add_vocab_size(c.vocab_size)
    if file_type is not None:
        writer.add_file_type(file_type)
    for name in ckpt.names():
        if name in skip or (name == "output.weight" and c.tie_word_embeddings):
            continue  # tied: llama.cpp's converter writes token_embd only
        w = hf_tensor(ckpt, name, torch.float32)  # what the converter reads: HF's layout
        if heads_of(name):
            w = llama_cpp_permute(w, c.n_heads, c.n_kv_heads if name.endswith("wk.weight") else c.n_heads)
        data = w.numpy()
        changed = change(gguf_name(name), data) if change else None
        encoded, raw_dtype = changed or _encoded(data, kind if data.ndim > 1 else "F32")
        writer.add_tensor(gguf_name(name), encoded, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


if __name__ == "__main__":  # python tests/gguf_files.py CKPT OUT.gguf [KIND]
    out = write_gguf(sys.argv[1], sys.argv[2], *(sys.argv[3:4] or ["Q8_0"]))
    print(f"wrote {out} ({sys.argv[3] if len(sys.argv) > 3 else 'Q8_0'} matrices, F32 vectors)")
