"""What `verify` says besides the verdict (issue 20.4): how it ran (isolated, batched, generated), why the two sides'
greedy tokens differ beside a PASS (both sides' logits and the float64 oracle's margin), and no third-party warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harness import record, tracing
from harness.cli import main
from harness.names import ORACLE_PREFIX
from harness.report import generation_lines, greedy_tie, next_token_lines, run_mode
from harness.verify import verify

TOKENS = [1, 5, 7, 2]


def write_trace(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    with tracing(path):
        record("tokens", torch.tensor(TOKENS))
        for name, value in tensors.items():
            record(name, value)
    return path


def logits_pair(out: Path, name: str, oracle: list[float], ref: list[float], impl: list[float]) -> Path:
    """reference.h5 (its logits and their float64 oracle) in `out`, and the implementation's trace; the last row of
    each holds the given values over a 3-token vocabulary."""
    rows = lambda last: torch.cat([torch.zeros(len(TOKENS) - 1, 3), torch.tensor([last])]).double()  # noqa: E731
    out.mkdir(exist_ok=True)
    write_trace(out / "reference.h5", {name: rows(ref).float(), ORACLE_PREFIX + name: rows(oracle)})
    return write_trace(out / "scratch.h5", {name: rows(impl).float()})


def one_pass(out: Path, impl_path: Path, a: int, b: int):
    return SimpleNamespace(
        out=out, trace_path=impl_path, implementation="scratch", reference_token=a, implementation_token=b
    )


def test_run_mode_says_isolated_batched_or_generated():
    assert run_mode(isolated=False, vectorized=False, generate=0, implementation="scratch") == (
        "run: end to end (each layer fed its own previous layer's output); one forward pass over the prompt"
    )
    isolated = run_mode(isolated=True, vectorized=True, generate=0, implementation="scratch")
    assert isolated.startswith("run: isolated layers (each layer of scratch fed the reference's input to it)")
    assert "attention batched (every head at once, --vectorized)" in isolated
    generated = run_mode(isolated=False, vectorized=False, generate=4, implementation="my.py:forward")
    assert "a prefill and 4 decode steps with the KV cache" in generated and "my.py:forward's no-cache" in generated


@pytest.mark.parametrize("flags", [[], ["--isolated"], ["--vectorized"], ["--generate", "2"]])
def test_verify_prints_how_it_ran(flags, tmp_path, monkeypatch, capsys):
    result = SimpleNamespace(
        comparison=SimpleNamespace(tokens=TOKENS),
        steps=[],
        cache_check=[],
        reference_token=5,
        implementation_token=5,
        reference_text=" a",
        implementation="scratch",
        implementation_text=" a",
        reference_generated=[],
        implementation_generated=[],
        unexplained=[],
        replaced=[],
        out=tmp_path,
        passed=True,
    )
    monkeypatch.setattr("harness.verify.verify", lambda *args, **kwargs: result)
    monkeypatch.setattr("harness.report.text_report", lambda c: "PASS")
    assert main(["verify", "ck", *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    mode = run_mode(
        isolated="--isolated" in flags,
        vectorized="--vectorized" in flags,
        generate=2 if "--generate" in flags else 0,
        implementation="scratch",
    )
    assert lines[-2] == mode, lines


def test_a_next_token_disagreement_beside_pass_says_near_tie_and_why(tmp_path):
    """The oracle puts tokens 0 and 1 0.1 apart; each side's logits err by up to 0.3 there: a near tie."""
    impl = logits_pair(tmp_path, "logits", oracle=[5.1, 5.0, 1.0], ref=[5.3, 5.0, 1.0], impl=[5.0, 5.2, 1.0])
    (line,) = next_token_lines(one_pass(tmp_path, impl, 0, 1))
    assert line == (
        "next tokens differ: logits of 0 (the reference's) and 1 (scratch's): reference 5.3 and 5, scratch 5 and "
        "5.2; the float64 oracle puts them 0.1 apart (5.1 and 5), within the two sides' logit errors (0.4): a near "
        "tie, rounding"
    )
    assert next_token_lines(one_pass(tmp_path, impl, 0, 0)) == []


def test_a_disagreement_beyond_the_logits_errors_says_so(tmp_path):
    impl = logits_pair(tmp_path, "logits", oracle=[5.0, 3.0, 1.0], ref=[5.0, 3.0, 1.0], impl=[4.0, 4.1, 1.0])
    (line,) = next_token_lines(one_pass(tmp_path, impl, 0, 1))
    assert line.endswith(
        "the float64 oracle puts them 2 apart (5 and 3), more than the two sides' logit errors (1.1): beyond rounding"
    )


def test_a_generation_near_tie_shows_both_logits_and_the_oracles_margin(tmp_path):
    impl = logits_pair(tmp_path, "steps.1.logits", oracle=[5.1, 5.0, 1.0], ref=[5.3, 5.0, 1.0], impl=[5.0, 5.2, 1.0])
    result = SimpleNamespace(
        **vars(one_pass(tmp_path, impl, 0, 0)),
        steps=[],
        cache_check=[],
        reference_text="",
        implementation_text="",
        reference_generated=[2, 0],
        implementation_generated=[2, 1],
        unexplained=[],
    )
    lines = generation_lines(result)
    assert lines[-2].startswith("greedy tokens differ at step 1: near ties")
    assert lines[-1] == "  step 1: " + greedy_tie(result, "steps.1.logits", 0, 1)
    assert "the float64 oracle puts them 0.1 apart" in lines[-1]


def test_without_its_traces_a_disagreement_keeps_the_one_line(tmp_path):
    assert greedy_tie(one_pass(tmp_path, tmp_path / "none.h5", 0, 1), "logits", 0, 1) is None
    assert next_token_lines(one_pass(tmp_path, tmp_path / "none.h5", 0, 1)) == []


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [dict(dtype="bfloat16", generate=2), dict(isolated=True)], ids=["generate", "iso"])
def test_a_normal_verify_emits_no_warning(tiny_checkpoint, tmp_path, kwargs):
    """transformers 5.x is called with the arguments it wants (the KV cache as `cache=` where it warns about
    `past_key_values`): no warning of any kind, from any library, on a verify of tiny 3.1."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = verify(tiny_checkpoint("3.1"), out=tmp_path / "v", **kwargs)
    assert result.passed
    assert not caught, [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
