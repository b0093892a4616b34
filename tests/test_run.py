"""The run path (harness/run.py): a run's inputs checked before any work, the shapes each name must have, and one
call of an implementation traced, with its errors as one line naming it. Fake forwards: no reference is run."""

import dataclasses

import pytest
import torch

import harness
from harness.errors import HarnessError
from harness.generation import trace_generation
from harness.implementation import Implementation
from harness.run import expected_shape, make_run, trace
from harness.trace_file import load_trace


@pytest.fixture(scope="module")
def run(tiny_checkpoint):
    return make_run(tiny_checkpoint("3.0"))


def forward(checkpoint, tokens, *, dtype, device, start_pos=0, cache=None):
    """Records one name and returns logits of the contract's shape: zeros [T, vocab]."""
    harness.record("embeddings", torch.zeros(len(tokens), checkpoint.config.dim))
    return torch.zeros(len(tokens), checkpoint.config.vocab_size)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(dtype="float8"), "unknown dtype 'float8'"),
        (dict(device="tpu:0"), "unknown device 'tpu:0'"),
        (dict(generate=-1), "--generate -1: expected a number of decode steps, 0 or more"),
        (dict(generate=2, isolated=True), "--isolated with --generate"),
        (dict(generate=9000), "plus --generate 9000 is longer than the model's context of 8192"),
    ],
)
def test_make_run_refuses_bad_input_before_any_work(tiny_checkpoint, options, message):
    with pytest.raises(HarnessError, match=message):
        make_run(tiny_checkpoint("3.0"), **options)


def test_expected_shapes_outside_generation(run):
    P, c = len(run.tokens), run.checkpoint.config
    assert expected_shape(run, "tokens") == (P,)
    assert expected_shape(run, "layers.2.attention.heads.7.scores") == (P, P)
    assert expected_shape(run, "layers.0.feed_forward.gate") == (P, c.ffn_dim)
    assert expected_shape(run, "logits") == (P, c.vocab_size)
    for name in ("layers.3.output", "layers.0.attention.heads.8.q", "steps.1.logits", "my_extra"):
        assert expected_shape(run, name) is None, name


def test_expected_shapes_of_a_generation(run):
    P, hd = len(run.tokens), run.checkpoint.config.head_dim
    gen = dataclasses.replace(run, generate=2)
    head = "layers.0.attention.heads.0"
    assert expected_shape(gen, "tokens") == (P + 2,)
    assert expected_shape(gen, f"steps.0.{head}.scores") == (P, P)
    assert expected_shape(gen, f"steps.2.{head}.cache_k") == (P + 2, hd)
    assert expected_shape(gen, f"steps.2.{head}.probs") == (1, P + 2)
    assert expected_shape(gen, f"steps.3.{head}.q") is None, "no step 3 in a generation of 2"


def test_trace_records_tokens_metadata_and_the_returned_logits(run, tmp_path):
    logits = trace(run, Implementation("fake", forward, {"note": "mine"}), tmp_path / "t.h5")
    with load_trace(tmp_path / "t.h5") as t:
        assert t.names == ["tokens", "embeddings", "logits"] and t.tokens == run.tokens
        assert t.attrs["implementation"] == "fake" and t.attrs["note"] == "mine" and t.attrs["isolated"] is False
        assert torch.equal(t["logits"], logits)


def broken(what):
    def forward(checkpoint, tokens, *, dtype, device, start_pos=0, cache=None):
        V, D = checkpoint.config.vocab_size, checkpoint.config.dim
        if what == "raises":
            raise ValueError("no weights")
        if what != "records nothing":
            harness.record("embeddings", torch.zeros(len(tokens), D + (what == "records a wrong shape")))
        return torch.zeros(len(tokens), V + 1) if what == "returns wrong logits" else torch.zeros(len(tokens), V)

    return Implementation("mine", forward)


@pytest.mark.parametrize(
    "what, message",
    [
        ("raises", r"^mine raised ValueError: no weights \(rerun with --debug for the traceback\)$"),
        ("records nothing", r"^mine: recorded nothing: call harness.record\(NAME, tensor\)"),
        ("returns wrong logits", r"^mine: returned logits \[17, 769\], expected a tensor of shape \[17, 768\] \("),
        ("records a wrong shape", r"^mine: recorded 'embeddings' with shape \[17, 129\], expected \[17, 128\]$"),
    ],
)
def test_a_failing_implementation_is_one_line_and_writes_nothing(run, tmp_path, what, message):
    with pytest.raises(HarnessError, match=message):
        trace(run, broken(what), tmp_path / "t.h5")
    assert not (tmp_path / "t.h5").exists()


@pytest.mark.parametrize(
    "what, message",
    [
        ("raises", r"^mine raised ValueError at step 0 \(start_pos 0\): no weights \(rerun with --debug"),
        ("records nothing", r"^mine: recorded nothing"),
        ("returns wrong logits", r"^mine: step 0 returned logits \[17, 769\], expected .*T = the step's new tokens"),
        (
            "records a wrong shape",
            r"^mine: recorded 'steps.0.embeddings' with shape \[17, 129\], expected \[17, 128\]$",
        ),
    ],
)
def test_a_failing_decode_step_names_its_step(run, tmp_path, what, message):
    with pytest.raises(HarnessError, match=message):
        trace_generation(dataclasses.replace(run, generate=1), broken(what), tmp_path / "t.h5")
    assert not (tmp_path / "t.h5").exists()


def test_a_generation_is_not_a_plain_run(run, tmp_path):
    with pytest.raises(HarnessError, match="trace_generation traces it"):
        trace(dataclasses.replace(run, generate=1), Implementation("fake", forward), tmp_path / "t.h5")


def test_isolated_mode_needs_the_references_trace(run, tmp_path):
    with pytest.raises(HarnessError, match="isolated mode needs the reference's trace"):
        trace(dataclasses.replace(run, isolated=True), Implementation("fake", forward), tmp_path / "t.h5")
