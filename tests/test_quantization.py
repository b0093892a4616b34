"""harness/quantization.py: the report of a GGUF's quantization against the checkpoint's own weights, and
`verify --weights-from` with an implementation that dequantizes the GGUF's Q8_0 blocks itself (tests/data/q8_llama.py):
correct, it passes; with a scale read from the next block (the mutant), it fails at the first projection, layer 0's q.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.checkpoint import open_checkpoint
from harness.cli import main
from harness.quantization import BANDS, band_line, depth_rows, kl_per_position
from harness.verify import verify
from tests.gguf_files import write_gguf
from tests.helpers import assert_expected

Q8_LLAMA = Path(__file__).parent / "data" / "q8_llama.py"


@pytest.fixture(scope="module")
def q8_gguf(tiny_checkpoint, tmp_path_factory):
    """`q8_gguf(variant)` -> (the tiny's folder, its Q8_0 GGUF), written once per module."""
    made = {}

    def get(variant: str = "3.0"):
        if variant not in made:
            ckpt = tiny_checkpoint(variant)
            gguf = write_gguf(open_checkpoint(ckpt), tmp_path_factory.mktemp("q8") / "tiny-q8.gguf", "Q8_0")
            made[variant] = ckpt, gguf
        return made[variant]

    return get


def test_kl_per_position_is_zero_for_equal_logits_and_positive_otherwise():
    """KL(P || Q) = sum P (log P - log Q): 0 for the same logits; for two tokens with logits (0, 0) and (0, log 3),
    P = (1/2, 1/2), Q = (1/4, 3/4): 1/2 log 2 + 1/2 log(2/3)."""
    a = torch.zeros(3, 2)
    assert_expected(kl_per_position(a, a), torch.zeros(3, dtype=torch.float64))
    b = torch.tensor([[0.0, float(torch.log(torch.tensor(3.0)))]])
    expected = 0.5 * torch.log(torch.tensor(2.0, dtype=torch.float64)) + 0.5 * torch.log(torch.tensor(2 / 3))
    assert_expected(kl_per_position(torch.zeros(1, 2), b), expected[None].double(), rtol=1e-6)


def test_depth_rows_take_each_layers_attention_output_and_output():
    names = {"embeddings": 0.1, "norm": 0.5, "logits": 0.6}
    names |= {f"layers.{i}.attention.output": 0.2 + i for i in range(2)}
    names |= {f"layers.{i}.output": 0.3 + i for i in range(2)}
    rows = depth_rows(names, 2)
    assert [r["name"] for r in rows] == ["embeddings", "layer 0", "layer 1", "norm", "logits"]
    assert rows[2] == {"name": "layer 1", "attention.output": 1.2, "output": 1.3}


def test_band_line_cites_llama_cpps_figures():
    assert "q8_0 mean KLD 0.001355, top-1 97.67%" in band_line("q8_0")
    assert all(band in band_line(None) for band in BANDS)
    assert "tools/perplexity/README.md" in band_line(None)


@pytest.mark.slow
def test_report_on_a_tiny_q8_0(q8_gguf, tmp_path, capsys):
    ckpt, gguf = q8_gguf()
    assert main(["quantization", str(ckpt), "--gguf", str(gguf), "--out", str(tmp_path / "q")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert report["kl_mean"] > 0 and report["kl_p99"] >= report["kl_mean"] and report["kl_max"] >= report["kl_p99"]
    assert 0 <= report["top1_agreement"] <= 1 and len(report["kl"]) == report["n_tokens"] == 17
    assert (
        report["types"] == "Q8_0 x 23, F32 x 7" and report["band"] == "q8_0" and report["reference_dtype"] == "float32"
    )
    assert [r["name"] for r in report["depth"]] == ["embeddings", "layer 0", "layer 1", "layer 2", "norm", "logits"]
    assert all(0 < v < 1 for v in report["names"].values())  # Q8_0 moves every name, by less than itself
    assert report["bands_source"].startswith("https://github.com/ggml-org/llama.cpp/")
    assert "logits: KL(original || quantized) mean" in printed and "top-1 agreement" in printed
    assert (tmp_path / "q" / "quantization.html").read_text().count("<tr>") == 6 + 1 + len(BANDS) + 1


@pytest.mark.slow
@pytest.mark.parametrize("variant, dtype", [("3.0", "float32"), ("3.0", "bfloat16"), ("3.2", "float32")])
def test_q8_llama_passes_on_the_ggufs_weights(q8_gguf, tmp_path, variant, dtype):
    """3.2: tied embeddings, the output matrix read from token_embd (no output.weight in the file)."""
    ckpt, gguf = q8_gguf(variant)
    result = verify(ckpt, out=tmp_path / "v", dtype=dtype, impl=f"{Q8_LLAMA}:forward", weights_from=gguf)
    assert result.passed, result.comparison.first_divergence


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_q8_llama_with_a_scale_from_the_wrong_block_fails_at_the_first_projection(q8_gguf, tmp_path, dtype):
    """The embeddings (llama.cpp's get_rows: the correct kernel) and layer 0's norm pass; layer 0's q, the first
    product with a Q8_0 matrix (wq), is the first name off."""
    ckpt, gguf = q8_gguf()
    result = verify(ckpt, out=tmp_path / "v", dtype=dtype, impl=f"{Q8_LLAMA}:forward_wrong_scale", weights_from=gguf)
    assert not result.passed
    assert result.comparison.first_divergence == "layers.0.attention.heads.0.q"
    passed = {r.name for r in result.comparison.results if r.passed}
    assert {"embeddings", "layers.0.attention_norm"} <= passed
