"""`Llama3Model` of the book "Build a Large Language Model From Scratch" (package llms-from-scratch), traced.

Verify it:  python -m harness verify CHECKPOINT --impl examples/llms_from_scratch_adapter.py:ADAPTER
                [--dtype bfloat16] [--isolated | --generate N]
Needs: pip install --no-deps llms-from-scratch==1.0.19 (its declared dependencies pull tensorflow and jupyterlab; this
model needs only torch and tiktoken). It rotates q/k by halves, as Hugging Face does: wq/wk rows are permuted on load
and its q/k are mapped back to Meta's interleaved pairs. Its RMSNorm eps is hard-coded 1e-5 (Llama-3's).
`scores` are softmax's input (masked, then divided by sqrt(head_dim)), judged on their causal part; `torch.softmax`
is wrapped for the run. The model is the package's KV-cache variant (`llms_from_scratch.kv_cache.llama3`): without a
cache the same forward as `llms_from_scratch.llama3`'s, with the same parameters. `--generate`: the book's own
`KVCache`, kept in the harness's cache dict; the model counts positions itself (`current_pos`, 0 in a fresh model).
"""

import torch
from llms_from_scratch.kv_cache.llama3 import KVCache, Llama3Model

from harness.adapter import (
    META_PATHS,
    Adapter,
    drop_batch,
    input_of,
    interleave_halves,
    kv_to_query_heads,
    llama_taps,
    output_of,
)
from harness.hf_layout import heads_of, permute_to_hf

# Meta's names -> its names, part by part: "layers.0.attention.wq.weight" -> "trf_blocks.0.att.W_query.weight"
PARTS = {
    "tok_embeddings": "tok_emb",
    "layers": "trf_blocks",
    "norm": "final_norm",
    "output": "out_head",  # output: tied in 3.2
    "attention_norm": "norm1",
    "attention": "att",
    "wq": "W_query",
    "wk": "W_key",
    "wv": "W_value",
    "wo": "out_proj",
    "ffn_norm": "norm2",
    "feed_forward": "ff",
    "w1": "fc1",
    "w3": "fc2",
    "w2": "fc3",
}  # fc1 gate, fc2 up, fc3 down


def book_name(name):
    return ".".join(PARTS.get(part, part) for part in name.split("."))


def book_tensor(checkpoint, name):
    """(its name, tensor) of a Meta tensor, wq/wk rows permuted to the half-split order of its rotate-half RoPE."""
    tensor = checkpoint.tensor(name)
    if heads := heads_of(name):
        tensor = permute_to_hf(tensor, getattr(checkpoint.config, heads))
    return book_name(name), tensor


def build(checkpoint, dtype, device):
    c, s = checkpoint.config, checkpoint.config.rope_scaling
    rope = s and dict(
        factor=s.factor,
        low_freq_factor=s.low_freq_factor,
        high_freq_factor=s.high_freq_factor,
        original_context_length=s.original_max_position_embeddings,
    )
    with torch.device(device):  # cos/sin buffers stay float32 (its RoPE rotates in float32), the weights in `dtype`
        model = Llama3Model(
            dict(
                vocab_size=c.vocab_size,
                context_length=c.max_seq_len,
                emb_dim=c.dim,
                n_heads=c.n_heads,
                n_layers=c.n_layers,
                hidden_dim=c.ffn_dim,
                n_kv_groups=c.n_kv_heads,
                rope_base=c.rope_theta,
                rope_freq=rope,
                dtype=dtype,
            )
        )
    model.load_state_dict(dict(book_tensor(checkpoint, name) for name in checkpoint.names()))
    return model.eval()


_ROPE = (
    "llms_from_scratch.kv_cache.llama3:apply_rope"  # x [1, H|KV, T, hd] -> rotated; on queries (call 0), then keys (1)
)
_HEAD = "layers.{layer}.attention.heads.{head}"
TAPS = llama_taps({meta: book_name(path) for meta, path in META_PATHS.items()}, half_split=True) | {
    f"{_HEAD}.q_rotated": output_of(_ROPE, drop_batch, interleave_halves, call=0),
    f"{_HEAD}.k_rotated": output_of(_ROPE, drop_batch, kv_to_query_heads, interleave_halves, call=1),
    f"{_HEAD}.scores": input_of(
        "torch:softmax", drop_batch
    ),  # masked, then / sqrt(head_dim): compare takes the causal part
    f"{_HEAD}.probs": output_of("torch:softmax", drop_batch),  # [1, H, T, T]
}

_ATT = "trf_blocks.{layer}.att"  # -> (output, (keys, values)): the cache attended, [1, KV, K, hd], the step's appended
CACHE_TAPS = {
    f"{_HEAD}.cache_k": output_of(_ATT, drop_batch, kv_to_query_heads, interleave_halves, index=(1, 0)),
    f"{_HEAD}.cache_v": output_of(_ATT, drop_batch, kv_to_query_heads, index=(1, 1)),
}

ADAPTER = Adapter(
    build=build,
    taps=TAPS,
    layers="trf_blocks.{layer}",
    final_norm="final_norm",
    cache_taps=CACHE_TAPS,
    run_step=lambda model, tokens, start_pos, cache: model(
        tokens[None], cache=cache.setdefault("kv", KVCache(n_layers=model.cfg["n_layers"]))
    ),
)
