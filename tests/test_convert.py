"""Meta <-> HF conversion: bit-exact round trip, loadable by transformers offline, the same tensors either way."""

import json

import pytest
import torch
from safetensors import safe_open

from harness.checkpoint import load_pth, open_checkpoint
from harness.convert import convert
from harness.errors import HarnessError

VARIANTS = ["3.0", "3.1", "3.2"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_hf_meta_round_trip_is_bit_exact(tiny_checkpoint, tmp_path, variant):
    src = tiny_checkpoint(variant)
    convert(src, tmp_path / "hf", to="hf")
    convert(tmp_path / "hf", tmp_path / "meta", to="meta")
    before, after = load_pth(src / "consolidated.00.pth"), load_pth(tmp_path / "meta" / "consolidated.00.pth")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    assert (src / "tokenizer.model").read_bytes() == (tmp_path / "meta" / "tokenizer.model").read_bytes()
    a, b = open_checkpoint(src).config, open_checkpoint(tmp_path / "meta").config
    # multiple_of/ffn_dim_multiplier are found anew from HF's intermediate_size: same FFN width, maybe other factors
    assert a.ffn_dim == b.ffn_dim and {**a.to_dict(), "multiple_of": 0, "ffn_dim_multiplier": 0} == {**b.to_dict(), "multiple_of": 0, "ffn_dim_multiplier": 0}


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_directory_gives_the_meta_tensors(tiny_checkpoint, variant):
    meta, hf = open_checkpoint(tiny_checkpoint(variant)), open_checkpoint(tiny_checkpoint(variant, "hf"))
    assert hf.format == "hf" and hf.config.tie_word_embeddings == meta.config.tie_word_embeddings
    for name in meta.names():
        assert torch.equal(hf.tensor(name), meta.tensor(name)), name
    assert hf.fingerprint() == meta.fingerprint()


def test_hf_q_k_rows_are_permuted_and_v_is_not(tiny_checkpoint):
    """HF's q_proj rows are Meta's reordered per head (even rows, then odd rows); v_proj is untouched."""
    meta = open_checkpoint(tiny_checkpoint("3.0"))
    with safe_open(str(tiny_checkpoint("3.0", "hf") / "model.safetensors"), framework="pt") as f:
        q_hf = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        v_hf = f.get_tensor("model.layers.0.self_attn.v_proj.weight")
    q_meta = meta.tensor("layers.0.attention.wq.weight")
    hd = meta.config.head_dim
    assert torch.equal(q_hf[: hd // 2], q_meta[0:hd:2]) and torch.equal(q_hf[hd // 2 : hd], q_meta[1:hd:2])
    assert not torch.equal(q_hf, q_meta)
    assert torch.equal(v_hf, meta.tensor("layers.0.attention.wv.weight"))


def test_hf_output_loads_offline_with_transformers(tiny_checkpoint, monkeypatch):
    from transformers import AutoTokenizer, LlamaForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tiny_checkpoint("3.2", "hf")
    model = LlamaForCausalLM.from_pretrained(path)
    assert model.config.tie_word_embeddings and model.config.rope_parameters["rope_type"] == "llama3"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.bos_token == "<|begin_of_text|>" and tok("hi").input_ids[0] == tok.bos_token_id == 512
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["intermediate_size"] == 384
    assert (path / "original" / "tokenizer.model").exists() and (path / "generation_config.json").exists()


def test_convert_refuses_a_non_empty_destination(tiny_checkpoint, tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(HarnessError, match="not an empty directory"):
        convert(tiny_checkpoint("3.0"), tmp_path / "dst", to="hf")
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["dst"], "no temporary folder left behind"
