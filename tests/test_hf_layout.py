"""harness/hf_layout.py: Meta <-> Hugging Face tensor names, the q/k row permutation for `rotate_half` and its inverse,
and the LlamaConfig a harness config becomes."""

from __future__ import annotations

import pytest
import torch

from harness import hf_layout
from harness.checkpoint import open_checkpoint
from tests.helpers import assert_expected


@pytest.mark.parametrize(
    "hf, meta",
    [
        ("model.embed_tokens.weight", "tok_embeddings.weight"),
        ("model.layers.12.self_attn.k_proj.weight", "layers.12.attention.wk.weight"),
        ("model.layers.0.mlp.gate_proj.weight", "layers.0.feed_forward.w1.weight"),
        ("model.layers.31.post_attention_layernorm.weight", "layers.31.ffn_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ],
)
def test_names_translate_both_ways(hf, meta):
    assert hf_layout.hf_to_meta_name(hf) == meta and hf_layout.meta_to_hf_name(meta) == hf


def test_an_unknown_name_translates_to_none():
    assert hf_layout.hf_to_meta_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert hf_layout.meta_to_hf_name("rope.freqs") is None
    assert len(hf_layout.META_TO_HF) == len(hf_layout.HF_TO_META) == 12


def test_the_permutation_puts_each_heads_even_rows_first_and_inverts():
    """2 heads of head_dim 4: Meta's rows (0, 1, 2, 3 | 4, 5, 6, 7) in HF's order are (0, 2, 1, 3 | 4, 6, 5, 7)."""
    w = torch.arange(8.0)[:, None].expand(8, 3)  # [2 * hd, dim]: row i holds i
    hf = hf_layout.permute_to_hf(w, n_heads=2)
    assert hf[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert_expected(hf_layout.permute_to_meta(hf, n_heads=2), w)


def test_half_split_to_interleaved_undoes_the_permutation_per_head():
    """A head's output from HF's rows, mapped back, is the output of Meta's rows (here: its row indices)."""
    hf = hf_layout.permute_to_hf(torch.arange(8.0)[:, None], n_heads=2)[:, 0].view(2, 4)  # [H, hd]
    assert hf_layout.half_split_to_interleaved(hf).flatten().tolist() == list(range(8))


@pytest.mark.parametrize(
    "name, heads",
    [
        ("layers.3.attention.wq.weight", "n_heads"),
        ("layers.3.attention.wk.weight", "n_kv_heads"),
        ("layers.3.attention.wv.weight", None),
        ("tok_embeddings.weight", None),
    ],
)
def test_only_wq_and_wk_are_permuted(name, heads):
    assert hf_layout.heads_of(name) == heads


@pytest.mark.parametrize(
    "variant, rope_type, tied", [("3.0", "default", False), ("3.1", "llama3", False), ("3.2", "llama3", True)]
)
def test_hf_config_carries_the_shapes_rope_and_tied_head(tiny_checkpoint, variant, rope_type, tied):
    c = open_checkpoint(tiny_checkpoint(variant)).config
    hf = hf_layout.hf_config(c)
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads) == (
        c.dim,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
    )
    assert (hf.intermediate_size, hf.vocab_size, hf.rms_norm_eps) == (c.ffn_dim, c.vocab_size, c.norm_eps)
    assert hf.rope_parameters["rope_type"] == rope_type and hf.rope_parameters["rope_theta"] == c.rope_theta
    assert hf.tie_word_embeddings == tied
    if rope_type == "llama3":
        assert hf.rope_parameters["factor"] == c.rope_scaling.factor == 8.0
