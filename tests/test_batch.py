"""Batches (`--prompts`, `--padding`): the splitter, the names, bad input; a correct padded batch passes for the scratch
forward, examples/my_llama.py and the Hugging Face reference; each batching mutant fails at its own name and sequence.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from harness import names as canon
from harness.batch import Batch, read_prompts
from harness.batch_run import trace_batched, trace_batched_generation, trace_truth
from harness.cli import main
from harness.compare import compare_traces
from harness.errors import HarnessError
from harness.implementation import builtin, resolve
from harness.run import DEFAULT_PROMPT, make_run, prompt_tokens
from harness.trace_file import load_trace
from harness.verify import verify
from tests import mutants
from tests.helpers import assert_expected, compute_once

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
MY_LLAMA = f"{ROOT / 'examples' / 'my_llama.py'}:forward"


def exact_prompts(ckpt, counts=(1, 5, 17, 60)) -> list[str]:
    """Prompts of exactly these token counts (with <|begin_of_text|>), cut from the default prompt repeated."""
    text = (DEFAULT_PROMPT + " ") * 8
    found = []
    for count in counts:
        cut = next((text[:n] for n in range(len(text)) if len(prompt_tokens(ckpt, text[:n])) == count), None)
        assert cut is not None, f"no prefix of {count} tokens"
        found.append(cut)
    return found


# ---- the parts, fast -------------------------------------------------------------------------------------------------


def test_read_prompts_lines_and_json(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("first one\n\nsecond\n", encoding="utf-8")
    assert read_prompts(lines) == ["first one", "second"]
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps(["a\nb", ""]), encoding="utf-8")
    assert read_prompts(listed) == ["a\nb", ""]


@pytest.mark.parametrize(
    "content, message",
    [("", "no prompts"), ("[1, 2]", "list of strings"), ('["a",', "not a JSON list")],
)
def test_read_prompts_refuses(tmp_path, content, message):
    path = tmp_path / "p.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(HarnessError, match=message):
        read_prompts(path)


def test_padding_and_mask_left_and_right():
    left = Batch(((1, 2), (3, 4, 5, 6)), "left", pad_id=9)
    assert left.tokens().tolist() == [[9, 9, 1, 2], [3, 4, 5, 6]]
    assert left.attention_mask(decoded=1).tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    right = Batch(((1, 2), (3, 4, 5, 6)), "right", pad_id=9)
    assert right.tokens().tolist() == [[1, 2, 9, 9], [3, 4, 5, 6]]
    assert list(right.real_columns(0)) == [0, 1]


def test_split_takes_real_rows_and_key_columns():
    batch = Batch(((1, 2), (3, 4, 5)), "left")
    scores = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 3, 3)  # [B, T, K]
    parts = dict(batch.split()("layers.0.attention.heads.0.scores", scores, None))
    assert_expected(parts[0], scores[0, 1:, 1:], what="sequence 0: rows and columns 1..2")
    assert_expected(parts[1], scores[1], what="sequence 1: whole")
    hidden = torch.zeros(2, 3, 4)  # [B, T, D]
    assert dict(batch.split()("layers.0.output", hidden, None))[0].shape == (2, 4)


def test_split_names_a_wrong_batch_axis():
    batch = Batch(((1, 2), (3, 4, 5)), "left")
    with pytest.raises(HarnessError, match=r"B = 2 sequences first; got shape \[3, 4\]"):
        list(batch.split()("layers.0.output", torch.zeros(3, 4), None))


def test_batch_names_parse_and_order():
    name = canon.batch_name(1, canon.step_name(2, "layers.0.attention.heads.3.q"))
    assert name == "batch.1.steps.2.layers.0.attention.heads.3.q"
    assert canon.split_batch(name) == (1, "steps.2.layers.0.attention.heads.3.q")
    assert canon.split_step(name) == (2, "layers.0.attention.heads.3.q")
    assert canon.parse(name) == (0, 3, "q")
    assert canon.scope(name) == "batch.1.steps.2."
    ordered = sorted(["batch.1.layers.0.output", "batch.0.norm", "batch.0.layers.0.output"], key=canon.order_key)
    assert ordered == ["batch.0.layers.0.output", "batch.1.layers.0.output", "batch.0.norm"]


def test_batch_refuses_isolated_and_functions_without_a_mask(tiny_checkpoint, tmp_path):
    with pytest.raises(HarnessError, match="--prompts with --isolated"):
        make_run(tiny_checkpoint("3.0"), prompts=["a"], isolated=True)
    run = make_run(tiny_checkpoint("3.0"), prompts=["a", "bb"])

    def forward(checkpoint, tokens, *, dtype, device):
        return torch.zeros(*tokens.shape, checkpoint.config.vocab_size)

    with pytest.raises(HarnessError, match="takes no attention_mask"):
        trace_batched(run, resolve(forward), tmp_path / "t.h5")
    assert not (tmp_path / "t.h5").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompts", "missing.txt"], "prompts file not found"),
        (["--prompts", "p.txt", "--isolated"], "--prompts with --isolated"),
        (["--prompts", "p.txt", "--padding", "middle"], "invalid choice"),
    ],
)
def test_verify_prompts_bad_input(tiny_checkpoint, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a\nb\n", encoding="utf-8")
    try:
        code = main(["verify", str(tiny_checkpoint()), *extra])
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "verify-out").exists()


# ---- correct batches pass, mutants fail at their name ----------------------------------------------------------------


def _truth(tiny_checkpoint, tmp_path_factory, worker_id, dtype, padding, generate):
    """The truth (the reference alone on each sequence, with its oracle), traced once per session per dtype and
    generation: it does not depend on the padding (each sequence runs unpadded)."""
    ckpt = tiny_checkpoint("3.0")

    def compute(folder):
        run = make_run(ckpt, prompts=exact_prompts(ckpt), dtype=dtype, generate=generate)
        trace_truth(run, builtin("reference"), folder / "truth.h5")
        return str(folder / "truth.h5")

    return compute_once(tmp_path_factory, worker_id, f"batch-truth-{dtype}-{generate}", compute)


def _batched(ckpt, truth, impl, out, dtype, padding, generate):
    run = make_run(ckpt, prompts=exact_prompts(ckpt), padding=padding, dtype=dtype, generate=generate)
    if generate:
        with load_trace(truth) as reference:
            trace_batched_generation(run, impl, out, reference=reference)
    else:
        trace_batched(run, impl, out)
    return compare_traces(truth, out)


@pytest.mark.slow
@pytest.mark.xdist_group("batch")
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["scratch", MY_LLAMA, "reference"])
def test_correct_batch_passes(tiny_checkpoint, tmp_path_factory, worker_id, tmp_path, impl, dtype, padding):
    truth = _truth(tiny_checkpoint, tmp_path_factory, worker_id, dtype, padding, 0)
    c = _batched(tiny_checkpoint("3.0"), truth, resolve(impl), tmp_path / "b.h5", dtype, padding, 0)
    assert c.passed, (c.first_divergence, max(r.ratio for r in c.results))
    per_sequence = {canon.split_batch(r.name)[0] for r in c.results}
    assert per_sequence == {0, 1, 2, 3}
    assert len(c.results) == 4 * (222 if impl != "reference" else 24)  # HF batched: its modules' outputs


@pytest.mark.slow
@pytest.mark.xdist_group("batch")
@pytest.mark.parametrize("padding", ["left", "right"])
def test_correct_batch_generation_passes(tiny_checkpoint, tmp_path_factory, worker_id, tmp_path, padding):
    truth = _truth(tiny_checkpoint, tmp_path_factory, worker_id, "bfloat16", padding, 1)
    c = _batched(tiny_checkpoint("3.0"), truth, resolve(MY_LLAMA), tmp_path / "b.h5", "bfloat16", padding, 1)
    assert c.passed, c.first_divergence
    assert any(canon.split_step(r.name)[0] == 1 for r in c.results)


@pytest.mark.slow
@pytest.mark.xdist_group("batch")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mutant", mutants.BATCH, ids=lambda m: m.id)
def test_batch_mutant_fails_at_its_name(
    tiny_checkpoint, tmp_path_factory, worker_id, tmp_path, monkeypatch, mutant, dtype
):
    ckpt = tiny_checkpoint("3.0")
    truth = _truth(tiny_checkpoint, tmp_path_factory, worker_id, dtype, mutant.padding, mutant.generate)
    mutant.apply(monkeypatch, None)
    c = _batched(ckpt, truth, builtin("scratch"), tmp_path / "b.h5", dtype, mutant.padding, mutant.generate)
    assert c.first_divergence == mutant.first
    unpadded = [r for r in c.results if canon.split_batch(r.name)[0] == 3]  # the longest: no pads, not touched
    assert all(r.passed for r in unpadded)


@pytest.mark.slow
def test_verify_prompts_cli(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt = tiny_checkpoint("3.1")
    (tmp_path / "prompts.json").write_text(json.dumps(exact_prompts(ckpt, (1, 9))), encoding="utf-8")
    code = main(["verify", str(ckpt), "--prompts", "prompts.json", "--padding", "right", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "batched: 2 sequences of 1, 9 tokens, right-padded to 9" in out
    assert "sequence 0 (1 token, 8 pads): PASS 222/222" in out
    assert "reference check: Hugging Face on the same padded batch against each sequence alone: PASS 48 names" in out
    data = json.loads((tmp_path / "verify-out" / "comparison.json").read_text())
    assert [s["tokens"] for s in data["batch"]["sequences"]] == [1, 9]
    assert data["batch"]["reference_batched"]["passed"] is True
    assert sorted(p.name for p in (tmp_path / "verify-out").glob("*.h5")) == [
        "reference-batched.h5",
        "reference.h5",
        "scratch.h5",
    ]


@pytest.mark.slow
def test_plugin_batch_names_the_sequence(pytester, tiny_checkpoint):
    """`--llama3-prompts` in the plugin: a correct batch is green (test_plugin.py covers the options); a batch whose
    pad keys are attended fails the probs of the padded sequences, naming `batch.{b}.` and the sequence's tokens."""
    shutil.copy(ROOT / "tests" / "data" / "pad_keys_attended.py", pytester.path / "pad_keys_attended.py")
    ckpt = tiny_checkpoint("3.0")
    (pytester.path / "prompts.txt").write_text("hi\n" + DEFAULT_PROMPT + "\n", encoding="utf-8")
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-n",
        "0",
        "-q",
        f"--llama3-checkpoint={ckpt}",
        "--llama3-prompts=prompts.txt",
        "--llama3-dtype=float32",
        "--llama3-impl=pad_keys_attended.py:forward",
    )
    out = result.stdout.str()
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) > 0 and outcomes.get("passed", 0) > 0, out
    assert "batch.0.layers.0.attention.heads.0.probs diverges" in out


def test_trace_batch_keeps_the_names_asked_and_the_tokens(tiny_checkpoint, tmp_path):
    """`trace --prompts --names 'layers.0.*'`: each sequence's layer-0 names and its tokens, nothing else; a sequence's
    tokens are its own, without the pads."""
    run = make_run(tiny_checkpoint("3.0"), prompts=["a", "abc def"], names=["layers.0.ffn_norm"], padding="right")
    trace_batched(run, builtin("scratch"), tmp_path / "t.h5")
    with load_trace(tmp_path / "t.h5") as t:
        assert sorted(t.names) == [
            "batch.0.layers.0.ffn_norm",
            "batch.0.tokens",
            "batch.1.layers.0.ffn_norm",
            "batch.1.tokens",
        ]
        assert t["batch.0.tokens"].tolist() == list(run.batch.sequences[0])
        assert t.shape("batch.0.layers.0.ffn_norm") == (len(run.batch.sequences[0]), 128)


@pytest.mark.slow
def test_verify_batch_says_what_its_longest_sequence_cannot_see(tiny_checkpoint, tmp_path):
    """A batch's blind-spots line (tiny 3.1 has scaled RoPE): that of its longest sequence, in the JSON too."""
    ckpt = tiny_checkpoint("3.1")
    prompts = exact_prompts(ckpt, (1, 17))
    result = verify(ckpt, out=tmp_path / "v", dtype="bfloat16", prompts=prompts, padding="left")
    assert result.passed
    assert any(line.startswith("blind spots: at 17 tokens in bfloat16") for line in result.batch_lines)
    data = json.loads((tmp_path / "v" / "comparison.json").read_text())
    assert data["blind_spots"]["prompt_tokens"] == 17
