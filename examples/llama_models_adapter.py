"""Meta's reference Llama-3 (`llama_models.llama3.model.Transformer`, package llama-models) traced by the harness.

Verify it:  python -m harness verify CHECKPOINT --impl examples/llama_models_adapter.py:ADAPTER
                [--dtype bfloat16] [--isolated | --generate N]
Needs: pip install llama-models==0.3.0 fairscale==0.4.13 (fairscale is imported but not declared). Its parameters have
Meta's names and q/k rows stay in Meta's interleaved order, so loading is 1:1 and no q/k transform applies.
`scores` are softmax's input: masked and scaled, judged on their causal part. Softmax is wrapped in torch itself for
the run (llama-models calls `F.softmax` at call time). `--generate`: its own KV cache, `cache_k`/`cache_v` preallocated
in each `Attention` and written at `start_pos`; a step is `model(tokens, start_pos)` on the module built at the prefill.
"""

import fairscale.nn.model_parallel.initialize as fs_init
import torch
from llama_models.llama3.args import ModelArgs
from llama_models.llama3.model import Transformer

from harness.adapter import Adapter, drop_batch, heads_first, input_of, kv_to_query_heads, llama_taps, output_of

# llama-models allocates a KV cache of max_batch_size x max_seq_len per layer in __init__ (32 GB for 8B at 128k
# tokens) and RoPE angles for 2 x max_seq_len positions; the harness runs one prompt: up to 8192 tokens here.
MAX_SEQ_LEN = 8192


def model_parallel() -> None:
    """Its fairscale layers want a model-parallel group: one process, gloo, an in-memory store (no port, no file)."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)


def build(checkpoint, dtype, device):
    model_parallel()
    c = (
        checkpoint.config
    )  # ModelArgs takes params.json's keys and ignores others, as llama-models' own loader relies on
    args = ModelArgs(
        **{
            **c.to_dict(),
            "use_scaled_rope": c.rope_scaling is not None,  # factor 8, hard-coded
            "max_batch_size": 1,
            "max_seq_len": min(c.max_seq_len, MAX_SEQ_LEN),
        }
    )
    with torch.device(device):
        model = Transformer(args)
    model.load_state_dict({name: checkpoint.tensor(name) for name in checkpoint.names()})  # Meta's names, 1:1
    return model.to(dtype).eval()  # freqs_cis is a plain attribute: stays complex64, as Meta rotates in float32


_ROPE = "llama_models.llama3.model:apply_rotary_emb"  # (xq, xk) [1, T, H|KV, hd] -> rotated, same shapes
_HEAD = "layers.{layer}.attention.heads.{head}"
TAPS = llama_taps() | {  # its modules have Meta's names: the default paths
    f"{_HEAD}.q_rotated": output_of(_ROPE, drop_batch, heads_first, index=0),
    f"{_HEAD}.k_rotated": output_of(_ROPE, drop_batch, heads_first, kv_to_query_heads, index=1),
    f"{_HEAD}.scores": input_of(
        "torch.nn.functional:softmax", drop_batch
    ),  # masked and scaled: compare takes the causal part
    f"{_HEAD}.probs": output_of("torch.nn.functional:softmax", drop_batch),  # [1, H, T, T], float32 in every dtype
}
_REPEAT_KV = "llama_models.llama3.model:repeat_kv"  # the cache attended [1, K, KV, hd]: keys (call 0), values (1)
CACHE_TAPS = {
    f"{_HEAD}.cache_k": input_of(_REPEAT_KV, drop_batch, heads_first, kv_to_query_heads, call=0),
    f"{_HEAD}.cache_v": input_of(_REPEAT_KV, drop_batch, heads_first, kv_to_query_heads, call=1),
}

ADAPTER = Adapter(
    build=build,
    taps=TAPS,
    layers="layers.{layer}",
    final_norm="norm",
    run=lambda model, tokens: model(tokens[None], start_pos=0),
    run_step=lambda model, tokens, start_pos, cache: model(tokens[None], start_pos=start_pos),
    cache_taps=CACHE_TAPS,
)
