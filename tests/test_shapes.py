"""`make-tiny --shape`: real-size params for benchmarks (never generated here), deterministic generation, CUDA."""

import json

import pytest
import torch

from harness.checkpoint import open_checkpoint
from harness.cli import main
from harness.config import config_from_params_json
from harness.errors import HarnessError
from harness.golden import read_manifest, sha256
from harness.tiny import SHAPES, make_tensor, make_tiny, shape_params


@pytest.mark.parametrize("shape, n_layers", [("8b-wide", 2), ("8b", 32)])
def test_8b_shapes_have_the_8b_dimensions(tmp_path, shape, n_layers):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(shape_params(shape, "3.1")))
    c = config_from_params_json(path)
    assert (c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size) == (4096, 32, 8, 128, 14336, 128256)
    assert c.n_layers == n_layers and c.rope_scaling_factor == 8.0


@pytest.mark.parametrize(
    "shape, dims",
    [("70b-wide", (8192, 64, 8, 128, 28672, 128256)), ("405b-wide", (16384, 128, 8, 128, 53248, 128256))],
)
def test_70b_and_405b_wide_shapes_have_their_dimensions(tmp_path, shape, dims):
    """Meta-Llama-3-70B's and Llama-3.1-405B's dim, heads, KV heads, head_dim, FFN and vocabulary, 2 layers or
    `layers`."""
    path = tmp_path / "params.json"
    for layers, want in ((None, 2), (6, 6)):
        path.write_text(json.dumps(shape_params(shape, "3.0", layers)))
        c = config_from_params_json(path)
        assert (c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size) == dims
        assert c.n_layers == want


def test_make_tiny_layers_writes_that_many_and_remakes_them(tmp_path, capsys):
    from harness.tiny import read_recipe, remake

    assert main(["make-tiny", str(tmp_path / "t"), "--layers", "5"]) == 0
    assert "tiny of 5 layers" in capsys.readouterr().out
    recipe = read_recipe(tmp_path / "t")
    assert recipe["layers"] == 5 and open_checkpoint(tmp_path / "t").config.n_layers == 5
    assert (
        open_checkpoint(remake(recipe, tmp_path / "again")).fingerprint()
        == open_checkpoint(tmp_path / "t").fingerprint()
    )
    assert main(["make-tiny", str(tmp_path / "u"), "--layers", "0"]) == 2
    assert "expected a whole number, 1 or more" in capsys.readouterr().err and not (tmp_path / "u").exists()


def test_a_real_size_shape_is_written_a_block_of_rows_at_a_time(tmp_path, monkeypatch):
    """Past _CHUNK_ELEMENTS a checkpoint is written by torch.save with room for each tensor (`skip_data`), then each
    drawn into place a block of rows at a time: the same tensors, a zip whose CRCs check, loaded as any other."""
    import zipfile

    import harness.tiny as tiny

    monkeypatch.setattr(tiny, "_CHUNK_ELEMENTS", 4096)  # the tiny shape's matrices drawn by blocks, written so
    tiny.make_tiny_meta(tmp_path / "t", variant="3.2")
    path = tmp_path / "t" / "consolidated.00.pth"
    assert zipfile.ZipFile(path).testzip() is None
    sd = torch.load(path, weights_only=True)
    ckpt = open_checkpoint(tmp_path / "t")
    assert ckpt.config.tie_word_embeddings and torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])
    for name in ckpt.names():
        assert torch.equal(sd[name], make_tensor(name, ckpt.shape(name), seed=0)) or name == "output.weight", name


def test_big_tensors_are_generated_in_bf16_row_blocks_deterministically(monkeypatch):
    import harness.tiny as tiny

    monkeypatch.setattr(tiny, "_CHUNK_ELEMENTS", 1000)  # force the blocked path on a small shape
    a = make_tensor("layers.0.feed_forward.w1.weight", (300, 64), seed=3)
    b = make_tensor("layers.0.feed_forward.w1.weight", (300, 64), seed=3)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert 0.9 < float(a.float().std() * 64**0.5) < 1.1, "gain 1/sqrt(fan_in) kept in the blocked path"
    assert not torch.equal(a, make_tensor("layers.0.feed_forward.w1.weight", (300, 64), seed=4))


def test_tiny_shape_bytes_are_those_in_the_golden_manifest(tmp_path):
    make_tiny(tmp_path / "t", variant="3.0", shape="tiny")
    recorded = read_manifest()["files"]["tiny-3.0-seed0-float32.h5"]["checkpoint_sha256"]
    assert sha256(tmp_path / "t" / "consolidated.00.pth") == recorded


def test_unknown_shape_is_refused(tmp_path, capsys):
    with pytest.raises(HarnessError, match="unknown shape 'huge'"):
        make_tiny(tmp_path / "x", shape="huge")
    assert main(["make-tiny", str(tmp_path / "y"), "--shape", "8b-wide", "--variant", "9.9"]) == 2
    capsys.readouterr()
    assert main(["make-tiny", str(tmp_path / "z"), "--shape", "70b"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: '70b'" in err and len(err.strip().splitlines()) == 1
    assert not any((tmp_path / d).exists() for d in "xyz")
    assert set(SHAPES) == {"tiny", "8b-wide", "8b", "70b-wide", "405b-wide"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys):
    assert main(["verify", str(tiny_checkpoint("3.0")), "--device", "cuda", "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "v").exists()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_on_cuda(tiny_checkpoint, tmp_path, dtype):
    from harness.verify import verify

    result = verify(tiny_checkpoint("3.0"), out=tmp_path / "v", dtype=dtype, device="cuda")
    assert result.passed, result.comparison.first_divergence
    assert open_checkpoint(tiny_checkpoint("3.0")).config.n_layers == 3
