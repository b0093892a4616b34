"""harness/gguf_weights.py: a GGUF's tensors read back in Meta's names and layout under a checkpoint's config, and the
one-line errors for a file that is not one, lacks a tensor, has other shapes or a type it cannot dequantize.

GGUFs written by tests/gguf_files.py as llama.cpp's converter writes them (HF's q/k rows through its permute); the
expected values are the checkpoint's own tensors (bf16 values, exact in F32) and Q8_0's bound: |x - d * q| <= d / 2
with d = max |x| / 127 per block of 32, plus d's fp16 rounding (127 * d * 2^-11 at most).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

import numpy as np
import pytest
import torch

from harness.checkpoint import open_checkpoint
from harness.cli import main
from harness.errors import HarnessError
from harness.gguf_weights import gguf_name, open_gguf_weights
from harness.run import make_run
from tests.gguf_files import quantize_q4_k, write_gguf
from tests.helpers import assert_expected


@pytest.fixture(scope="module")
def tiny_gguf(tiny_checkpoint, tmp_path_factory):
    """`tiny_gguf(kind, variant)` -> (checkpoint, GGUF path), written once per module."""
    made = {}

    def get(kind: str = "Q8_0", variant: str = "3.0"):
        if (kind, variant) not in made:
            ckpt = open_checkpoint(tiny_checkpoint(variant))
            path = tmp_path_factory.mktemp("gguf") / f"tiny-{variant}-{kind}.gguf"
            made[kind, variant] = ckpt, write_gguf(ckpt, path, kind)
        return made[kind, variant]

    return get


@pytest.mark.parametrize("variant", ["3.0", "3.2"])
def test_f32_round_trip_gives_back_every_tensor_exactly(tiny_gguf, variant):
    """Names mapped back, ggml's reversed dims undone, q/k rows in Meta's order (llama.cpp's permute of HF's rows is
    the inverse of HF's), tied embeddings (3.2: no output.weight in the file) read from token_embd."""
    ckpt, path = tiny_gguf("F32", variant)
    weights = open_gguf_weights(path, ckpt)
    for name in ckpt.names():
        assert_expected(weights.tensor(name), ckpt.tensor(name).float(), what=name)
    assert weights.config == ckpt.config and weights.tokenizer_path == ckpt.tokenizer_path


def test_rows_and_take_read_the_same_values_as_tensor(tiny_gguf):
    ckpt, path = tiny_gguf("Q8_0")
    weights = open_gguf_weights(path, ckpt)
    whole = weights.tensor("layers.1.feed_forward.w2.weight")
    assert_expected(weights.rows("layers.1.feed_forward.w2.weight", 5, 9), whole[5:9], what="rows 5:9")
    ids = torch.tensor([7, 3, 7, 500])
    assert_expected(weights.take("tok_embeddings.weight", ids), weights.tensor("tok_embeddings.weight")[ids])
    assert weights.tensor("norm.weight").shape == (ckpt.config.dim,)


def test_q8_0_dequantized_weights_are_within_q8_0_error(tiny_gguf):
    ckpt, path = tiny_gguf("Q8_0")
    weights = open_gguf_weights(path, ckpt)
    assert weights.quant_type("layers.0.attention.wq.weight") == "Q8_0"
    assert weights.quant_type("layers.0.attention_norm.weight") == "F32"
    for name in ckpt.names():
        x, y = ckpt.tensor(name).float(), weights.tensor(name)
        if x.dim() == 1:
            assert_expected(y, x, what=name)  # vectors stay F32
            continue
        blocks_x, blocks_y = x.reshape(-1, 32), y.reshape(-1, 32)
        d = blocks_x.abs().amax(-1, keepdim=True) / 127
        bound = d / 2 + 127 * d * 2.0**-11
        assert ((blocks_y - blocks_x).abs() <= bound + 1e-12).all(), name
        assert not torch.equal(x, y), f"{name}: Q8_0 left every value as it was"


def test_q4_k_packer_is_read_back_by_gguf_py():
    """tests/gguf_files.py's Q4_K blocks, dequantized by gguf-py: within half a quantization step of each 32-value
    sub-block (its scale d * sc, 6-bit) plus the 6-bit rounding of the scales and mins."""
    import gguf

    x = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    y = gguf.quants.dequantize(quantize_q4_k(x), gguf.GGMLQuantizationType.Q4_K)
    sub = x.reshape(-1, 32)
    step = (sub.max(-1) - np.minimum(sub.min(-1), 0)) / 15
    err = np.abs(y.reshape(-1, 32) - sub).max(-1)
    assert (err <= 0.5 * step + 0.2 * step.max()).all()
    assert 0.03 < np.linalg.norm(y - x) / np.linalg.norm(x) < 0.1  # 4 bits: a few percent, not exact, not noise


def test_fingerprint_is_the_gguf_files_sha256_and_traces_record_it(tiny_gguf):
    ckpt, path = tiny_gguf("Q8_0")
    run = make_run(ckpt, weights_from=path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert run.checkpoint.fingerprint() == sha != ckpt.fingerprint()
    assert run.checkpoint.metadata() == dict(
        weights_from=str(path), weights_from_sha256=sha, weights_from_types="Q8_0 x 23, F32 x 7"
    )


def test_file_type_is_what_the_file_was_asked_to_be(tiny_checkpoint, tmp_path):
    """general.file_type 15 (llama.cpp's MOSTLY_Q4_K_M) whatever the tensors' types (a tiny's Q4_K_M falls back to
    Q5_0: its rows of 128 are not a multiple of Q4_K's 256); none written, none read."""
    ckpt = open_checkpoint(tiny_checkpoint())
    asked = open_gguf_weights(write_gguf(ckpt, tmp_path / "a.gguf", "Q5_0", file_type=15), ckpt)
    assert asked.file_type == "MOSTLY_Q4_K_M" and asked.types() == "Q5_0 x 23, F32 x 7"
    assert open_gguf_weights(write_gguf(ckpt, tmp_path / "b.gguf"), ckpt).file_type is None


def test_not_a_gguf(tiny_checkpoint, tmp_path):
    ckpt = open_checkpoint(tiny_checkpoint())
    (tmp_path / "model.gguf").write_text("hello")
    with pytest.raises(HarnessError, match=r"model.gguf: not a GGUF file \(it starts with b'hell'"):
        open_gguf_weights(tmp_path / "model.gguf", ckpt)
    with pytest.raises(HarnessError, match="absent.gguf: GGUF file not found"):
        open_gguf_weights(tmp_path / "absent.gguf", ckpt)


def test_truncated_gguf(tiny_gguf, tmp_path):
    ckpt, path = tiny_gguf("Q8_0")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(HarnessError, match="cut.gguf: cannot read the GGUF header .truncated or corrupt"):
        open_gguf_weights(cut, ckpt)


def test_a_tensor_missing(tiny_checkpoint, tmp_path):
    ckpt = open_checkpoint(tiny_checkpoint())
    path = write_gguf(ckpt, tmp_path / "m.gguf", skip=("layers.1.feed_forward.w2.weight",))
    with pytest.raises(
        HarnessError, match=r"tensor 'blk.1.ffn_down.weight' \(layers.1.feed_forward.w2.weight\) is missing"
    ):
        open_gguf_weights(path, ckpt)


def test_shapes_not_matching_the_checkpoints_config(tiny_checkpoint, tmp_path):
    """The 3.2 tiny's GGUF (dim 96) under the 3.0 tiny's config (dim 128): its hyperparameters, or without them its
    tensors' shapes, named with both sides."""
    other, ckpt = open_checkpoint(tiny_checkpoint("3.2")), open_checkpoint(tiny_checkpoint("3.0"))
    with pytest.raises(HarnessError, match="llama.embedding_length is 96, the checkpoint .* has dim = 128"):
        open_gguf_weights(write_gguf(other, tmp_path / "a.gguf"), ckpt)
    with pytest.raises(HarnessError, match=r"token_embd.weight has shape \[768, 96\] .*implies \[768, 128\]"):
        open_gguf_weights(write_gguf(other, tmp_path / "b.gguf", hparams=False), ckpt)


def test_an_unsupported_quant_type_is_named(tiny_checkpoint, tmp_path):
    import gguf

    ckpt = open_checkpoint(tiny_checkpoint())

    def iq4_nl(name, data):  # 32 values in 18 bytes; zeros: only the type matters here
        if name != gguf_name("layers.0.attention.wq.weight"):
            return None
        return np.zeros((data.shape[0], data.shape[1] // 32 * 18), np.uint8), gguf.GGMLQuantizationType.IQ4_NL

    path = write_gguf(ckpt, tmp_path / "iq.gguf", change=iq4_nl)
    with pytest.raises(HarnessError, match="blk.0.attn_q.weight is IQ4_NL, a type this harness does not dequantize"):
        open_gguf_weights(path, ckpt)


def test_verify_weights_from_a_bad_file_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04")
    code = main(["verify", str(tiny_checkpoint()), "--weights-from", str(tmp_path / "x.gguf"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "x.gguf: not a GGUF file" in err, err


def test_trace_weights_from_records_the_gguf(tiny_gguf, tmp_path, capsys):
    """`trace --weights-from`: the scratch forward on the GGUF's weights; the trace names the file and its sha256."""
    from harness.trace_file import load_trace

    ckpt, path = tiny_gguf("Q8_0")
    out = tmp_path / "t.h5"
    assert main(["trace", str(ckpt.path), "--weights-from", str(path), "--out", str(out)]) == 0
    with load_trace(out) as trace:
        attrs = trace.attrs
    assert attrs["weights_from"] == str(path) and attrs["checkpoint"] == attrs["weights_from_sha256"]
    assert attrs["weights_from_types"] == "Q8_0 x 23, F32 x 7" and attrs["checkpoint_format"] == "gguf"


@pytest.mark.slow
@pytest.mark.skipif(
    not (os.environ.get("LLAMA_CPP_CONVERTER") and importlib.util.find_spec("sentencepiece")),
    reason="llama.cpp's converter: set LLAMA_CPP_CONVERTER (tox -e llamacpp does) and install sentencepiece",
)
@pytest.mark.parametrize("variant", ["3.0", "3.2"])
def test_llama_cpps_own_converter_reads_back_as_the_checkpoint(tiny_gguf, tmp_path, variant):
    """`python -m harness gguf` (llama.cpp's convert_hf_to_gguf.py): its F32 GGUF reads back as the checkpoint
    exactly, its Q8_0 as tests/gguf_files.py's Q8_0 exactly (the same layout, names and quantizer)."""
    from harness.gguf_convert import write_gguf as llama_cpp_gguf

    ckpt, ours = tiny_gguf("Q8_0", variant)
    f32 = open_gguf_weights(llama_cpp_gguf(ckpt.path, tmp_path / "f32.gguf", outtype="f32"), ckpt)
    q8 = open_gguf_weights(llama_cpp_gguf(ckpt.path, tmp_path / "q8.gguf", outtype="q8_0"), ckpt)
    mine = open_gguf_weights(ours, ckpt)
    for name in ckpt.names():
        assert_expected(f32.tensor(name), ckpt.tensor(name).float(), what=f"F32 {name}")
        assert_expected(q8.tensor(name), mine.tensor(name), what=f"Q8_0 {name}")
