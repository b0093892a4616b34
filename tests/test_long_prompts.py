"""Long prompts: the float64 oracle a block of query rows at a time, and the bounded [T, T] datasets every recording
path keeps past FULL_SQUARE_MAX_T tokens (the reference's taps, a blocked computation's `Rows`, the bare `record` API).

The prompts are just past FULL_SQUARE_MAX_T (1024) tokens on the tiny checkpoints: seconds, not minutes.
"""

from __future__ import annotations

import h5py
import pytest
import torch

import harness
from harness import hf_layout, reference, scratch
from harness.checkpoint import open_checkpoint
from harness.errors import HarnessError
from harness.names import FULL_SQUARE_MAX_T, SAMPLED_ROWS
from harness.trace_file import Rows, kept_rows, sampled_rows

T = FULL_SQUARE_MAX_T + 77  # past the bound, and not a multiple of any block below


def prompt_ids(ckpt, n_tokens: int) -> torch.Tensor:
    """`<|begin_of_text|>` and n_tokens - 1 ordinary token ids, drawn once (the tokenizer is not what is tested)."""
    bos = ckpt.config.vocab_size - 256
    return torch.cat([torch.tensor([bos]), torch.randint(0, bos, (n_tokens - 1,))])  # [T]


def datasets(path) -> dict[str, tuple[torch.Tensor, dict]]:
    """Every dataset of a trace by name: (values, the attributes that say which rows and what shape)."""
    out = {}
    with h5py.File(path) as f:

        def visit(p, ds):
            if isinstance(ds, h5py.Dataset):
                attrs = {k: ds.attrs[k].tolist() for k in ("rows", "full_shape") if k in ds.attrs}
                out[ds.attrs["name"]] = (torch.from_numpy(ds[()]), attrs)

        f.visititems(visit)
    return out


@pytest.fixture
def float64_frequencies(monkeypatch):
    """The scratch forward given HF's own RoPE frequencies, so that the float64 oracle and the float64 scratch forward
    differ by float64 rounding only (tests/test_reference.py::test_the_oracle_is_float64_exact)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    def frequencies(config):
        return LlamaRotaryEmbedding(config=hf_layout.hf_config(config)).inv_freq.double()

    monkeypatch.setattr(scratch, "rope_frequencies", frequencies)


@pytest.mark.slow  # the float64 oracle
@pytest.mark.parametrize("block_rows", [None, 100], ids=["one-block", "blocks-of-100"])
def test_the_blocked_oracle_records_what_whole_tensors_give(
    tiny_checkpoint, tmp_path, monkeypatch, float64_frequencies, block_rows
):
    """The float64 oracle a block of query rows at a time records exactly what the float64 scratch forward, which holds
    every head's [T, T] whole, records: the same names, the same sampled rows (`rows`, `full_shape`), the same values
    to float64 rounding. Logits bounded as well (FULL_LOGITS_MAX_ELEMENTS lowered so that a tiny vocabulary crosses
    it)."""
    ckpt = open_checkpoint(tiny_checkpoint("3.1"))
    if block_rows is not None:
        monkeypatch.setattr(reference, "ORACLE_BLOCK_ELEMENTS", block_rows * ckpt.config.n_heads * T)
    monkeypatch.setattr(harness.names, "FULL_LOGITS_MAX_ELEMENTS", 1 << 16)  # read at call time
    ids, names = prompt_ids(ckpt, T), ["layers.2.*", "logits"]  # the last layer: after every block of the others
    with harness.tracing(tmp_path / "oracle.h5", names=names), torch.inference_mode():
        reference.run_oracle(ckpt, ids, prefix="")
    with harness.tracing(tmp_path / "scratch.h5", names=names), torch.inference_mode():
        scratch.forward(ckpt, ids, dtype=torch.float64)
    oracle, whole = datasets(tmp_path / "oracle.h5"), datasets(tmp_path / "scratch.h5")
    assert sorted(oracle) == sorted(whole)
    probs, logits = "layers.2.attention.heads.7.probs", "logits"
    assert oracle[probs][1] == {"rows": sampled_rows(T), "full_shape": [T, T]} and oracle[probs][0].shape == (
        SAMPLED_ROWS,
        T,
    )
    assert oracle[logits][1] == {"rows": sampled_rows(T), "full_shape": [T, ckpt.config.vocab_size]}
    for name, (values, attrs) in whole.items():
        assert oracle[name][1] == attrs, name
        torch.testing.assert_close(oracle[name][0], values, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow  # the float64 oracle
def test_no_float64_softmax_holds_every_row(tiny_checkpoint, monkeypatch):
    """The oracle's softmax sees one block of query rows at a time, never a [1, H, T, T] float64 (4 GiB for the tiny
    model at 8192 tokens, three of them held at once before the blocks)."""
    ckpt = open_checkpoint(tiny_checkpoint("3.0"))
    block = 100 * ckpt.config.n_heads * T
    monkeypatch.setattr(reference, "ORACLE_BLOCK_ELEMENTS", block)
    seen = []
    softmax = torch.softmax

    def spy(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return softmax(x, *args, **kwargs)

    monkeypatch.setattr(torch, "softmax", spy)
    with torch.inference_mode():
        reference.run_oracle(ckpt, prompt_ids(ckpt, T), prefix="")
    assert len(seen) == ckpt.config.n_layers * -(-T // 100), seen  # ceil(T / 100) blocks per layer
    assert max(torch.Size(s).numel() for s in seen) <= block and all(s[2] <= 100 for s in seen)


def test_the_bfloat16_reference_records_the_same_rows_as_the_scratch_forward(tiny_checkpoint, tmp_path):
    """Hugging Face's side (eager attention, its scores tap computed for the kept rows only) and the scratch forward
    (whole [T, T] per head) keep the same rows of every scores/probs, and HF's scores of those rows are eager's own."""
    ckpt = open_checkpoint(tiny_checkpoint("3.0"))
    ids = prompt_ids(ckpt, T)
    names = ["layers.1.*"]
    with harness.tracing(tmp_path / "hf.h5", names=names), torch.inference_mode():
        reference.forward(ckpt, ids, dtype=torch.bfloat16, device="cpu", oracle=False)
    with harness.tracing(tmp_path / "scratch.h5", names=names), torch.inference_mode():
        scratch.forward(ckpt, ids, dtype=torch.bfloat16)
    hf, mine = datasets(tmp_path / "hf.h5"), datasets(tmp_path / "scratch.h5")
    assert sorted(hf) == sorted(mine) and len(hf) == 8 * 8 + 9  # 8 heads x 8, 9 per layer
    for name in hf:
        assert hf[name][1] == mine[name][1], name
    # the recomputed tap's kept rows against those rows of the whole scores (tap disabled: every row, sampled on record)
    name = "layers.1.attention.heads.3.scores"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(reference, "kept_rows", lambda name, shape: None)
        with harness.tracing(tmp_path / "whole.h5", names=[name]), torch.inference_mode():
            reference.forward(ckpt, ids, dtype=torch.bfloat16, device="cpu", oracle=False)
    whole = datasets(tmp_path / "whole.h5")[name]
    assert whole[1] == hf[name][1]
    torch.testing.assert_close(hf[name][0], whole[0], rtol=2**-8, atol=0)  # bfloat16 matmuls of other row counts


def test_a_third_party_recording_keeps_bounded_datasets(tmp_path):
    """Through the bare API a long [T, T] is stored as its sampled rows, whether recorded whole or as `Rows` (exactly
    the kept ones, or more): the three datasets are identical. `Rows` lacking a kept row is refused, naming it."""
    n = FULL_SQUARE_MAX_T + 300
    probs = torch.rand(n, n, dtype=torch.float64).to(torch.bfloat16)
    rows = kept_rows("layers.0.attention.heads.0.probs", (n, n))
    every_tenth = sorted(set(range(0, n, 10)) | set(rows))
    with harness.tracing(tmp_path / "t.h5"):
        harness.record("layers.0.attention.heads.0.probs", probs)
        harness.record("layers.0.attention.heads.1.probs", Rows(probs[rows], rows, n))
        harness.record("layers.0.attention.heads.2.probs", Rows(probs[every_tenth], every_tenth, n))
        harness.record("layers.0.attention.heads.0.output", torch.randn(n, 16))
    stored = datasets(tmp_path / "t.h5")
    for head in range(3):
        values, attrs = stored[f"layers.0.attention.heads.{head}.probs"]
        assert attrs == {"rows": rows, "full_shape": [n, n]} and values.shape == (SAMPLED_ROWS, n), head
        assert torch.equal(values, probs[rows].float()), head
    assert stored["layers.0.attention.heads.0.output"][1] == {}  # [T, head_dim] stays whole
    with h5py.File(tmp_path / "t.h5") as f:
        assert f["/layers/0/attention/heads/1/probs"].attrs["dtype"] == "bfloat16"
    lacking = rf"'layers.0.attention.heads.0.scores' recorded as 63 of its {n} rows, without row {n - 1} \(1 missing\)"
    with pytest.raises(HarnessError, match=lacking):
        with harness.tracing(tmp_path / "u.h5"):
            harness.record("layers.0.attention.heads.0.scores", Rows(probs[rows[:-1]], rows[:-1], n))
    with pytest.raises(HarnessError, match="every row"):  # short: a trace keeps every row, so Rows must hold them all
        with harness.tracing(tmp_path / "u.h5"):
            harness.record("layers.0.attention.heads.0.scores", Rows(probs[:2, :8], [0, 1], 8))
