"""Deliberately wrong adapters for the two examples: each must fail at `q`, the first name its mistake touches.

- llama-models keeps Meta's interleaved q/k; an adapter that maps them from HF's half-split order anyway (copied from
  the Hugging Face table) scrambles every recorded q/k.
- llms-from-scratch rotates by halves; an adapter that loads Meta's wq/wk rows without the half-split permutation runs a
  wrong RoPE, and its q (mapped back to interleaved pairs) no longer matches.

Wrong uses of each library's own KV cache (`--generate`), each caught at its own decode step and name:
- llama-models with every step run as the prefill, `start_pos=0`: the decoded token's key overwrites slot 0 and it
  attends to itself alone (`steps.1...cache_k`, by the shape check).
- llms-from-scratch with `reset_kv_cache()` before every step, the cache kept: positions restart at 0
  (`steps.1...q_rotated`, by the comparison).
"""

from dataclasses import replace
from pathlib import Path

import torch

from harness.adapter import interleave_halves
from harness.implementation import resolve

EXAMPLES = Path(__file__).resolve().parent.parent
meta = resolve(f"{EXAMPLES / 'llama_models_adapter.py'}:ADAPTER").forward
book = resolve(f"{EXAMPLES / 'llms_from_scratch_adapter.py'}:ADAPTER").forward

LLAMA_MODELS_HALF_SPLIT = replace(
    meta,
    taps={
        name: replace(tap, transforms=(*tap.transforms, interleave_halves))
        if name.endswith(("q", "k", "_rotated"))
        else tap
        for name, tap in meta.taps.items()
    },
)


def _build_unpermuted(checkpoint, dtype, device):
    model = book.build(checkpoint, dtype, device)
    with torch.no_grad():
        for layer, block in enumerate(model.trf_blocks):
            block.att.W_query.weight.copy_(checkpoint.tensor(f"layers.{layer}.attention.wq.weight"))  # Meta's row order
            block.att.W_key.weight.copy_(checkpoint.tensor(f"layers.{layer}.attention.wk.weight"))
    return model


LLMS_FROM_SCRATCH_UNPERMUTED = replace(book, build=_build_unpermuted)


LLAMA_MODELS_START_POS_0 = replace(meta, run_step=lambda model, tokens, start_pos, cache: meta.run(model, tokens))


def _reset_every_step(model, tokens, start_pos, cache):
    model.reset_kv_cache()  # its position counter back to 0; the cache itself kept
    return book.run_step(model, tokens, start_pos, cache)


LLMS_FROM_SCRATCH_POSITIONS_RESTART = replace(book, run_step=_reset_every_step)
