"""Meta <-> HF conversion: bit-exact round trip, loadable by transformers offline, the same tensors either way."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from harness.checkpoint import load_pth, open_checkpoint
from harness.cli import main
from harness.config import ffn_dim_from_meta
from harness.convert import _find_ffn_params, convert, meta_params
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
    for file in ("params.json", "tokenizer.model"):
        assert (src / file).read_bytes() == (tmp_path / "meta" / file).read_bytes(), file


def test_without_original_params_the_ffn_factors_are_found_anew(tiny_checkpoint, tmp_path):
    """An HF repo without original/params.json: multiple_of/ffn_dim_multiplier that give the same width are chosen."""
    shutil.copytree(tiny_checkpoint("3.1", "hf"), tmp_path / "hf")
    (tmp_path / "hf" / "original" / "params.json").unlink()
    convert(tmp_path / "hf", tmp_path / "meta", to="meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert (params["multiple_of"], params["ffn_dim_multiplier"], params["use_scaled_rope"]) == (64, 1.3, True)
    a, b = open_checkpoint(tiny_checkpoint("3.1")).config, open_checkpoint(tmp_path / "meta").config
    assert dataclasses.replace(b, multiple_of=32) == a


@pytest.mark.parametrize(
    "dim, ffn_dim, expected",
    [
        (4096, 14336, (2048, 1.3)),  # Llama-3-8B (Meta: 1024, 1.3)
        (8192, 28672, (4096, 1.3)),  # 70B (Meta: 4096, 1.3)
        (16384, 53248, (4096, 1.2)),  # 405B (Meta: 4096, 1.2)
        (2048, 8192, (4096, None)),  # 3.2-1B (Meta: 256, 1.5)
    ],
)
def test_ffn_factors_reproduce_real_widths(dim, ffn_dim, expected):
    multiple_of, multiplier = _find_ffn_params(dim, ffn_dim, Path("config.json"))
    assert (multiple_of, multiplier) == expected and ffn_dim_from_meta(dim, multiple_of, multiplier) == ffn_dim


def test_a_width_meta_cannot_write_is_an_error_naming_config_json(tiny_checkpoint):
    config = dataclasses.replace(
        open_checkpoint(tiny_checkpoint("3.0", "hf")).config,
        dim=4096,
        ffn_dim=13077,
        multiple_of=None,
        ffn_dim_multiplier=None,
    )
    with pytest.raises(HarnessError, match=r"hf/config.json: intermediate_size 13077 cannot be written"):
        meta_params(config, Path("hf/config.json"))


def test_tokenizer_model_is_rebuilt_from_tokenizer_json(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint("3.0", "hf"), tmp_path / "hf")
    shutil.rmtree(tmp_path / "hf" / "original")
    convert(tmp_path / "hf", tmp_path / "meta", to="meta")
    assert (tmp_path / "meta" / "tokenizer.model").read_bytes() == (
        tiny_checkpoint("3.0") / "tokenizer.model"
    ).read_bytes()


def test_cli_convert(tiny_checkpoint, tmp_path, capsys):
    assert main(["convert", str(tiny_checkpoint("3.2")), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert open_checkpoint(tmp_path / "hf").format == "hf"
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "hf"), "--to", "meta"]) == 2
    assert "not an empty directory" in capsys.readouterr().err


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
    assert (config["dtype"], config["bos_token_id"], config["eos_token_id"]) == ("bfloat16", 512, 513)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: only the embedding is stored
    assert (path / "original" / "tokenizer.model").exists() and (path / "generation_config.json").exists()


def test_convert_refuses_a_non_empty_destination(tiny_checkpoint, tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(HarnessError, match="not an empty directory"):
        convert(tiny_checkpoint("3.0"), tmp_path / "dst", to="hf")
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["dst"], "no temporary folder left behind"
