"""verify end to end on the tiny checkpoints: it passes the from-scratch forward, writes its report, confines a bug
in isolated mode, names NaN where it first appears, and refuses bad output folders.

Each test traces the Hugging Face reference (with its float64 oracle) and the from-scratch forward, except the one
that stops at the output folder.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from harness.checkpoint import load_pth, open_checkpoint
from harness.cli import main
from harness.compare import compare_traces
from harness.run import trace_scratch
from harness.verify import verify


@pytest.mark.slow
def test_verify_passes_and_writes_its_report(verified, case):
    """Every case of the suite (each tiny variant in float32 and bfloat16 by default), traced once per session."""
    run = verified(case)
    c = run.comparison
    worst = max(c["results"], key=lambda r: float(r["ratio"]))
    assert c["mode"] == "oracle", f"verify must calibrate on the reference's float64 oracle, got mode {c['mode']}"
    assert c["passed"], f"{case.id}: the correct forward diverged at {c['first_divergence']}"
    print(f"{case.id}: largest ratio {worst['ratio']:.3f} ({worst['floor_ratio']:.2f}x floor) at {worst['name']}")
    for f in (
        "reference.h5",
        "scratch.h5",
        "comparison.json",
        "report.html",
        "heads.png",
        "depth.png",
        "attention.png",
    ):
        assert (run.out / f).is_file(), f"verify did not write {f} into {run.out}"


def _drop_ffn_norm_weight_in_layer_1(original):
    def layer_weights(ckpt, layer, dtype, device):
        w = original(ckpt, layer, dtype, device)
        if layer == 1:
            w["ffn_norm"] = torch.ones_like(w["ffn_norm"])
        return w

    return layer_weights


@pytest.mark.slow
def test_isolated_verify_confines_a_bug_to_its_layer_and_exits_1(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """A bug in layer 1 only: isolated, layer 2 gets the reference's input and passes; end to end it would not."""
    from harness import scratch

    monkeypatch.setattr(scratch, "layer_weights", _drop_ffn_norm_weight_in_layer_1(scratch.layer_weights))
    out = tmp_path / "v"
    code = main(["verify", str(tiny_checkpoint("3.0")), "--out", str(out), "--dtype", "bfloat16", "--isolated"])
    assert code == 1, f"a diverging forward must exit 1, got {code}"
    c = json.loads((out / "comparison.json").read_text())
    failed = [r["name"] for r in c["results"] if not r["passed"]]
    assert c["first_divergence"] == "layers.1.ffn_norm", c["first_divergence"]
    assert all(n.startswith("layers.1.") for n in failed), f"isolated mode let the bug leak out of layer 1: {failed}"
    assert "layers.1.output" in failed, failed
    printed = capsys.readouterr().out
    assert "first divergence: layers.1.ffn_norm" in printed and "next token: reference" in printed, printed
    # end to end, the same bug drifts into layer 2 and the logits
    trace_scratch(open_checkpoint(tiny_checkpoint("3.0")), tmp_path / "e2e.h5", dtype="bfloat16")
    e2e = compare_traces(out / "reference.h5", tmp_path / "e2e.h5")
    assert not e2e.result("layers.2.output").passed, "without isolation the layer-1 bug should reach layer 2"


def test_verify_refuses_an_output_folder_without_a_parent(tiny_checkpoint, tmp_path, capsys):
    code = main(["verify", str(tiny_checkpoint("3.0")), "--out", str(tmp_path / "missing" / "out")])
    assert code == 2, f"expected exit 2, got {code}"
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_nan_in_the_weights_is_reported_where_it_first_appears(tiny_checkpoint, tmp_path, capsys):
    """A NaN in layer 1's w2 makes NaN in both implementations from layers.1.feed_forward.output on: exit 1, named."""
    src = tiny_checkpoint("3.0")
    bad = tmp_path / "nan"
    shutil.copytree(src, bad)
    sd = dict(load_pth(src / "consolidated.00.pth"))
    w2 = sd["layers.1.feed_forward.w2.weight"].clone()
    w2[3, 7] = float("nan")
    sd["layers.1.feed_forward.w2.weight"] = w2
    torch.save(sd, bad / "consolidated.00.pth")
    assert main(["verify", str(bad), "--out", str(tmp_path / "v")]) == 1
    out = capsys.readouterr().out
    assert "non-finite values first appear at layers.1.feed_forward.output" in out, out


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["3.0", "3.1"])
def test_verify_in_float64_passes_under_the_float64_bound(tiny_checkpoint, tmp_path, variant):
    """float64 on both sides, no oracle needed: RoPE frequencies in float32 as HF's inv_freq, so the two agree to
    ~1e-15."""
    result = verify(tiny_checkpoint(variant), out=tmp_path / "v", dtype="float64")
    assert result.passed and result.comparison.mode == "direct", result.comparison.first_divergence
    assert max(r.rel_l2 for r in result.comparison.results) < 1e-12
