"""The Hugging Face reference against the from-scratch forward in float32: same names, same shapes, same numbers.

Measured here: the largest relative L2 error over every name is about 1e-6 (printed with -s).
"""

import dataclasses

import pytest
import torch

from harness import hf_layout, load_trace
from harness.checkpoint import open_checkpoint
from harness.compare import rel_l2
from harness.reference import trace_reference
from harness.runner import trace_scratch

CASES = [(v, f) for v in ("3.0", "3.1", "3.2") for f in ("meta", "hf")]


@pytest.fixture(scope="module")
def float32_traces(tiny_checkpoint, tmp_path_factory):
    out = {}
    for variant, fmt in CASES:
        ckpt = open_checkpoint(tiny_checkpoint(variant, fmt))
        folder = tmp_path_factory.mktemp(f"ref-{variant}-{fmt}")
        trace_reference(ckpt, folder / "reference.h5", dtype="float32", oracle=False)
        trace_scratch(ckpt, folder / "scratch.h5", dtype="float32")
        out[variant, fmt] = folder
    return out


@pytest.mark.parametrize("variant, fmt", CASES)
def test_reference_matches_scratch_within_float32_rounding(float32_traces, variant, fmt):
    ref, scratch = (load_trace(float32_traces[variant, fmt] / f) for f in ("reference.h5", "scratch.h5"))
    assert ref.names == scratch.names
    worst, where = 0.0, None
    for name in ref.names:
        assert ref.shape(name) == scratch.shape(name), name
        if name == "tokens":
            assert torch.equal(ref[name], scratch[name])
            continue
        err = rel_l2(scratch[name].double(), ref[name].double())
        if err > worst:
            worst, where = err, name
        assert err < 1e-5, f"{name}: relative L2 error {err:.2e} between the float32 reference and scratch"
    print(f"tiny {variant} {fmt}: largest relative L2 error {worst:.2e} at {where}")


def test_reference_trace_holds_a_float64_oracle(tiny_checkpoint, tmp_path):
    ckpt = open_checkpoint(tiny_checkpoint("3.0"))
    trace_reference(ckpt, tmp_path / "r.h5", dtype="bfloat16")
    trace = load_trace(tmp_path / "r.h5")
    assert sorted(trace.extra_names) == sorted("_oracle." + n for n in trace.names if n != "tokens")
    assert trace.dtype("_oracle.layers.1.attention.heads.5.probs") == "float64"
    assert trace.dtype("layers.1.attention.heads.5.probs") == "bfloat16"
    assert trace.attrs["oracle"].startswith("float64")


def _diverges_at(tmp_path, ckpt_for_reference, ckpt, first_prefix):
    trace_reference(ckpt_for_reference, tmp_path / "ref.h5", dtype="float32", oracle=False)
    trace_scratch(ckpt, tmp_path / "scratch.h5", dtype="float32")
    ref, scratch = load_trace(tmp_path / "ref.h5"), load_trace(tmp_path / "scratch.h5")
    first = next((n for n in ref.names[1:] if rel_l2(scratch[n].double(), ref[n].double()) > 1e-5), None)
    assert first is not None and first.startswith(first_prefix), first


def test_a_wrong_q_k_permutation_is_caught(tiny_checkpoint, tmp_path, monkeypatch):
    ckpt = open_checkpoint(tiny_checkpoint("3.0"))
    monkeypatch.setattr(hf_layout, "permute_to_hf", lambda w, n: w)  # Meta's rows handed to rotate_half as they are
    _diverges_at(tmp_path, ckpt, ckpt, "layers.0.attention.heads.0.q")


def test_a_missing_rope_scaling_is_caught(tiny_checkpoint, tmp_path):
    ckpt = open_checkpoint(tiny_checkpoint("3.1"))
    unscaled = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, rope_scaling=None))
    _diverges_at(tmp_path, unscaled, ckpt, "layers.0.attention.heads.0.q_rotated")


def test_a_wrong_gqa_mapping_is_caught(tiny_checkpoint, tmp_path, monkeypatch):
    from harness import scratch

    ckpt = open_checkpoint(tiny_checkpoint("3.2"))  # 3 query heads per KV head
    monkeypatch.setattr(scratch, "kv_head_of", lambda head, config: head % config.n_kv_heads)
    _diverges_at(tmp_path, ckpt, ckpt, "layers.0.attention.heads.1.k")


def test_progress_bars_do_not_change_the_numbers(tiny_checkpoint, tmp_path):
    """The progress bar ticks from forward hooks; a hook that returned a value would replace the layer's output."""
    ckpt = open_checkpoint(tiny_checkpoint("3.0"))
    quiet = trace_reference(ckpt, tmp_path / "a.h5", dtype="bfloat16", progress=False)
    loud = trace_reference(ckpt, tmp_path / "b.h5", dtype="bfloat16", progress=True)
    assert torch.equal(quiet, loud)


def test_name_globs_filter_the_oracle_too(tiny_checkpoint, tmp_path):
    from harness.cli import main

    ckpt = tiny_checkpoint("3.0")
    assert main(["trace", str(ckpt), "--impl", "reference", "--dtype", "bfloat16", "--out", str(tmp_path / "r.h5"),
                 "--names", "layers.1.ffn_norm", "norm"]) == 0  # fmt: skip
    trace = load_trace(tmp_path / "r.h5")
    assert trace.names == ["tokens", "layers.1.ffn_norm", "norm"]
    assert sorted(trace.extra_names) == ["_oracle.layers.1.ffn_norm", "_oracle.norm"]
    assert main(["trace", str(ckpt), "--dtype", "bfloat16", "--out", str(tmp_path / "s.h5"), "--names", "layers.1.*"]) == 0
    assert main(["compare", str(tmp_path / "r.h5"), str(tmp_path / "s.h5")]) == 0  # compares the one name in common
