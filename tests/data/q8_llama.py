"""A Llama-3 on a Q8_0 GGUF's raw blocks, dequantized by its own kernels: the harness's scratch forward, its weights
read from the file `--weights-from` names (`checkpoint.gguf`), and a mutant whose kernel reads a wrong scale.

    python -m harness verify tiny --weights-from tiny-q8.gguf --impl tests/data/q8_llama.py:forward
    python -m harness verify tiny --weights-from tiny-q8.gguf --impl tests/data/q8_llama.py:forward_wrong_scale

As llama.cpp has two kernels, the embedding lookup (`get_rows`) and the projections (`mul_mat`) dequantize apart here:
the mutant's bug is in the projections' kernel only, so it must fail at the first projection, layers.0's q.
A Q8_0 block is 34 bytes: an fp16 scale d, then 32 int8 quants q; its values are d * q.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGUFReader

from harness import scratch
from harness.checkpoint import expected_shape
from harness.gguf_weights import gguf_name

BLOCK, BLOCK_BYTES = 32, 34  # values and bytes per Q8_0 block


def dequantize_rows(raw: np.ndarray, n_cols: int) -> torch.Tensor:
    """get_rows and mul_mat's kernel: Q8_0 rows, bytes [R, n_cols / 32 * 34] -> float32 [R, n_cols]."""
    blocks = raw.reshape(len(raw), n_cols // BLOCK, BLOCK_BYTES)  # [R, nb, 34]
    scales = blocks[..., :2].copy().view(np.float16).astype(np.float32)  # [R, nb, 1]
    quants = blocks[..., 2:].copy().view(np.int8).astype(np.float32)  # [R, nb, 32]
    return torch.from_numpy((scales * quants).reshape(len(raw), n_cols))


def dequantize_rows_wrong_scale(raw: np.ndarray, n_cols: int) -> torch.Tensor:
    """The mutant: each block scaled by the next block's d (the row's last by its first): an off-by-one in the scale
    index, the bug the harness must find at the first projection that reads it."""
    blocks = raw.reshape(len(raw), n_cols // BLOCK, BLOCK_BYTES)  # [R, nb, 34]
    scales = blocks[..., :2].copy().view(np.float16).astype(np.float32)  # [R, nb, 1]
    quants = blocks[..., 2:].copy().view(np.int8).astype(np.float32)  # [R, nb, 32]
    return torch.from_numpy((np.roll(scales, -1, axis=1) * quants).reshape(len(raw), n_cols))


class Q8Weights:
    """What scratch.forward reads of a checkpoint (`config`, `shape`, `tensor`, `rows`, `take`), from the GGUF's raw
    bytes: F32 vectors as they are, Q8_0 matrices through `matmul_kernel` (tensor, rows) or `dequantize_rows` (take)."""

    def __init__(self, checkpoint, matmul_kernel):
        path = getattr(checkpoint, "gguf", None)
        if path is None:
            raise ValueError("q8_llama reads a GGUF: run it with --weights-from MODEL.gguf")
        self.config, self.path, self.kernel = checkpoint.config, path, matmul_kernel
        tensors = {t.name: t for t in GGUFReader(path).tensors}  # the header: names, types, offsets
        self.stored = {}
        for name in checkpoint.names():
            key = gguf_name(name)
            if key not in tensors and name == "output.weight":
                key = "token_embd.weight"  # tied embeddings
            t = tensors[key]
            if t.tensor_type.name not in ("Q8_0", "F32"):
                raise ValueError(f"q8_llama reads Q8_0 and F32 tensors; {key} is {t.tensor_type.name}")
            self.stored[name] = (t.tensor_type.name, int(t.data_offset))

    def shape(self, name: str) -> tuple[int, ...]:
        return expected_shape(self.config, name)

    def _raw(self, name: str, start: int, stop: int) -> tuple[str, np.ndarray]:
        kind, offset = self.stored[name]
        n_cols = self.shape(name)[-1]
        row_bytes = 4 * n_cols if kind == "F32" else n_cols // BLOCK * BLOCK_BYTES
        with open(self.path, "rb") as f:
            f.seek(offset + start * row_bytes)
            raw = np.frombuffer(f.read((stop - start) * row_bytes), dtype=np.uint8)
        return kind, raw.reshape(stop - start, row_bytes)

    def rows(self, name: str, start: int, stop: int, kernel=None) -> torch.Tensor:
        if len(self.shape(name)) == 1:  # a norm's weight: F32 values
            return torch.from_numpy(self._raw(name, 0, 1)[1].copy().view(np.float32)[0, start:stop])
        kind, raw = self._raw(name, start, stop)
        if kind == "F32":
            return torch.from_numpy(raw.copy().view(np.float32))
        return (kernel or self.kernel)(raw, self.shape(name)[-1])  # [stop - start, cols]

    def tensor(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, self.shape(name)[0])

    def take(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """The embedding lookup (llama.cpp's get_rows): the rows at `ids` [T], by the correct kernel. -> [T, D]"""
        return torch.cat([self.rows(name, i, i + 1, kernel=dequantize_rows) for i in ids.tolist()])


def forward(checkpoint, tokens, *, dtype, device):
    return scratch.forward(Q8Weights(checkpoint, dequantize_rows), tokens, dtype=dtype, device=device)


def forward_wrong_scale(checkpoint, tokens, *, dtype, device):
    return scratch.forward(Q8Weights(checkpoint, dequantize_rows_wrong_scale), tokens, dtype=dtype, device=device)
