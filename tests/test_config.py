"""Configs from Meta's params.json and HF's config.json; expected values are those of Meta's published checkpoints."""

import json

import pytest
import torch

from harness.config import config_from_hf_json, config_from_params_json, ffn_dim_from_meta, rope_frequencies
from harness.errors import HarnessError

# params.json as shipped with Meta-Llama-3-8B, Llama-3.1-8B, Llama-3.2-1B and Meta-Llama-3-70B.
LLAMA3_8B = {
    "dim": 4096,
    "n_layers": 32,
    "n_heads": 32,
    "n_kv_heads": 8,
    "vocab_size": 128256,
    "multiple_of": 1024,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-05,
    "rope_theta": 500000.0,
}
LLAMA31_8B = {**LLAMA3_8B, "use_scaled_rope": True}
LLAMA32_1B = {
    "dim": 2048,
    "ffn_dim_multiplier": 1.5,
    "multiple_of": 256,
    "n_heads": 32,
    "n_kv_heads": 8,
    "n_layers": 16,
    "norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
    "vocab_size": 128256,
}
LLAMA3_70B = {
    "dim": 8192,
    "ffn_dim_multiplier": 1.3,
    "multiple_of": 4096,
    "n_heads": 64,
    "n_kv_heads": 8,
    "n_layers": 80,
    "norm_eps": 1e-05,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "params, ffn_dim, head_dim",
    [(LLAMA3_8B, 14336, 128), (LLAMA3_70B, 28672, 128), (LLAMA32_1B, 8192, 64)],
    ids=["8B", "70B", "3.2-1B"],
)
def test_ffn_width_and_head_dim_as_meta_computes_them(tmp_path, params, ffn_dim, head_dim):
    config = config_from_params_json(write(tmp_path, "params.json", params))
    assert (config.ffn_dim, config.head_dim) == (ffn_dim, head_dim)


def test_ffn_formula_without_multiplier():
    assert ffn_dim_from_meta(4096, 256, None) == 11008  # Llama-2-7B


def test_llama30_has_no_rope_scaling(tmp_path):
    config = config_from_params_json(write(tmp_path, "params.json", LLAMA3_8B))
    assert config.rope_scaling is None and config.rope_theta == 500000.0 and config.n_rep == 4


def test_scaled_rope_uses_metas_hard_coded_factor_8(tmp_path):
    config = config_from_params_json(write(tmp_path, "params.json", LLAMA32_1B))
    assert config.rope_scaling_factor == 8.0
    assert config.rope_scaling.original_max_position_embeddings == 8192
    assert (config.rope_scaling.low_freq_factor, config.rope_scaling.high_freq_factor) == (1.0, 4.0)


def test_hf_config_keeps_its_own_factor_32(tmp_path):
    hf = {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_hidden_layers": 16,
        "rms_norm_eps": 1e-5,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "head_dim": 64,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    }
    config = config_from_hf_json(write(tmp_path, "config.json", hf))
    assert config.rope_scaling_factor == 32.0 and config.tie_word_embeddings and config.head_dim == 64
    # transformers 5.x writes rope_parameters (with rope_theta inside) instead of rope_scaling
    hf5 = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta")}
    hf5["rope_parameters"] = {**hf["rope_scaling"], "rope_theta": 500000.0}
    assert config_from_hf_json(write(tmp_path, "config5.json", hf5)) == config


def test_rope_scaling_matches_transformers_llama3_init(tmp_path):
    """Our scaled frequencies against transformers' own `llama3` rope init on the 3.1-8B config."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = config_from_params_json(write(tmp_path, "params.json", LLAMA31_8B))
    hf = LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = rope_frequencies(config)
    torch.testing.assert_close(ours.float(), inv_freq.float(), rtol=1e-6, atol=0)
    unscaled = rope_frequencies(config_from_params_json(write(tmp_path, "p30.json", LLAMA3_8B)))
    assert (ours != unscaled).sum() > 10, "scaling should change the low frequencies"


@pytest.mark.parametrize("drop", ["dim", "n_layers", "n_heads", "vocab_size", "norm_eps", "multiple_of"])
def test_missing_required_key_is_named(tmp_path, drop):
    params = {k: v for k, v in LLAMA3_8B.items() if k != drop}
    with pytest.raises(HarnessError, match=f"params.json: required key '{drop}' is missing"):
        config_from_params_json(write(tmp_path, "params.json", params))


def test_inconsistent_heads_are_named(tmp_path):
    with pytest.raises(HarnessError, match=r"n_heads \(32\) must be divisible by n_kv_heads \(5\)"):
        config_from_params_json(write(tmp_path, "params.json", {**LLAMA3_8B, "n_kv_heads": 5}))
