"""Modules whose weights are read from the checkpoint when they run, so that one projection's are resident at a time:
a projection (`ReadLinear`, by blocks of rows past BLOCK_BYTES), the embeddings (`ReadEmbedding`, a row lookup), and a
decoder layer of transformers' Llama given them (`read_layer`). The reference (harness/reference.py) and its float64
oracle are built of these; docs/any-size.md shows the pattern for a user's Adapter.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

from . import hf_layout
from .checkpoint import Checkpoint


def hf_rows(ckpt: Checkpoint, meta_name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows `start` .. `stop - 1` of a tensor in HF's layout, read now, in `dtype`: q/k rows (whole heads) permuted
    for rotate_half."""
    t = ckpt.rows(meta_name, start, stop)
    if hf_layout.heads_of(meta_name):
        t = hf_layout.permute_to_hf(t, (stop - start) // ckpt.config.head_dim)
    return t.to(dtype)


def hf_tensor(ckpt: Checkpoint, meta_name: str, dtype: torch.dtype) -> torch.Tensor:
    """One tensor in HF's layout, read now: q/k rows permuted for rotate_half."""
    return hf_rows(ckpt, meta_name, 0, ckpt.shape(meta_name)[0], dtype)


# A projection whose weight, in the dtype it runs in, is larger than this is applied a block of its rows (output
# features) at a time, so that it is never held whole: a 405B layer is 25 GB in float64, its w1 alone 7 GB. The 8B's
# largest in float64 (w1, 470 MiB) and every projection of a bfloat16 70B (w1, 470 MiB) run whole, as nn.Linear.
BLOCK_BYTES = 1 << 30
LOGIT_ROWS = 16384  # vocabulary rows per chunk of the logits: the output matrix is read a chunk at a time


class ReadLinear(torch.nn.Module):
    """A bias-free nn.Linear whose weight is read from the checkpoint each time it runs and dropped after (HF's layout,
    in `dtype`): computed as nn.Linear computes it, `F.linear(x, weight)`; a weight over BLOCK_BYTES (or with
    `block_rows`) a block of rows at a time, their outputs concatenated."""

    def __init__(self, ckpt: Checkpoint, name: str, dtype: torch.dtype, device, block_rows: int | None = None):
        super().__init__()
        self.ckpt, self.name, self.dtype, self.device = ckpt, name, dtype, device
        n_rows, n_cols = ckpt.shape(name)
        rows = block_rows or max(1, BLOCK_BYTES // (n_cols * dtype.itemsize))
        if hf_layout.heads_of(name):  # whole heads: q/k rows are permuted within each
            rows = max(rows - rows % ckpt.config.head_dim, ckpt.config.head_dim)
        self.rows = min(rows, n_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_rows = self.ckpt.shape(self.name)[0]
        blocks = [
            torch.nn.functional.linear(
                x, hf_rows(self.ckpt, self.name, i, min(i + self.rows, n_rows), self.dtype).to(self.device)
            )
            for i in range(0, n_rows, self.rows)
        ]  # each [..., rows]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)  # [..., n_rows]

    def extra_repr(self) -> str:
        return f"{self.name}, {self.ckpt.shape(self.name)}, {self.dtype}, {self.rows} rows at a time"


class ReadEmbedding(torch.nn.Module):
    """The token embeddings by row lookup: only the rows of the tokens given are read. ids [..] -> [.., D]"""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, device):
        super().__init__()
        self.ckpt, self.dtype, self.device = ckpt, dtype, device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.ckpt.take("tok_embeddings.weight", ids.flatten().cpu())  # [N, D]
        return rows.to(device=self.device, dtype=self.dtype).view(*ids.shape, -1)


def read_layer(layer: LlamaDecoderLayer, ckpt: Checkpoint, dtype: torch.dtype, device, norm=LlamaRMSNorm) -> None:
    """Decoder layer `layer.self_attn.layer_idx`, built on the meta device, given its weights: each projection a
    ReadLinear (read when it runs), the two norms' weights (`norm`'s class) now."""
    index = layer.self_attn.layer_idx
    for name in ckpt.names():
        if not name.startswith(f"layers.{index}."):
            continue
        path = hf_layout.meta_to_hf_name(name).removeprefix(f"model.layers.{index}.").removesuffix(".weight")
        parent, _, attr = path.rpartition(".")
        if attr.endswith("layernorm"):
            module = norm_of(ckpt.tensor(name).to(device=device, dtype=dtype), ckpt.config.norm_eps, norm)
        else:
            module = ReadLinear(ckpt, name, dtype, device)
        setattr(layer.get_submodule(parent) if parent else layer, attr, module)


def norm_of(weight: torch.Tensor, eps: float, kind=LlamaRMSNorm) -> torch.nn.Module:
    norm = kind(weight.shape[0], eps=eps).to(device=weight.device, dtype=weight.dtype)
    norm.weight = torch.nn.Parameter(weight, requires_grad=False)
    return norm
