"""Long prompts: at ~4100 tokens in bfloat16, the RoPE bugs that a short prompt hides are caught at q_rotated, with the
first position where they leave the floor, and correct code (ours, and a notebook-style forward recording through the
bare API) passes.

Tiny 3.1 (Llama 3.1 RoPE scaling, factor 8; head_dim 16, so 8 rotation frequencies, 4 of them scaled). Only layer 0
is recorded (every name of it): the bugs sit in its RoPE, and the first divergence must be there, not later. The
reference is traced once for the module.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from harness import scratch
from harness.checkpoint import open_checkpoint
from harness.compare import compare_traces
from harness.config import rope_frequencies
from harness.implementation import builtin, resolve
from harness.run import make_run
from harness.runner import trace
from harness.tiny import CORPUS
from harness.tokenizer import load_tokenizer

N_TOKENS = 4100
NAMES = ["embeddings", "layers.0.*"]
Q0 = "layers.0.attention.heads.0.q_rotated"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "my_llama.py"


def XDIST_GROUP(item) -> str:
    return "long-context"  # one reference trace for the module


def long_prompt(tokenizer_path: Path, n_tokens: int) -> str:
    """The tiny corpus, repeated, cut to about n_tokens - 1 tokens (BOS makes n_tokens)."""
    enc = load_tokenizer(tokenizer_path)
    text = CORPUS.read_text(encoding="utf-8")
    ids = enc.encode(text * (1 + 2 * n_tokens // len(enc.encode(text))))[: n_tokens - 1]
    return enc.decode(ids)


def _frequencies(change):
    """scratch.rope_frequencies of a config changed by `change` (the checkpoint itself says otherwise)."""
    return lambda config: rope_frequencies(change(config))


def _angles_in(dtype: torch.dtype):
    """The notebook's freqs_cis with position x frequency computed in `dtype` (a low-precision angle at position p
    is off by about p x frequency x u: radians at thousands of tokens)."""

    def rope_freqs_cis(config, n_tokens, _dtype, device):
        freqs = rope_frequencies(config).to(dtype)  # [hd/2]
        angles = torch.outer(torch.arange(n_tokens, dtype=dtype), freqs).float()  # [T, hd/2], rounded to dtype
        return torch.polar(torch.ones_like(angles), angles).to(device)

    return rope_freqs_cis


def _factor(factor: float):
    return lambda c: dataclasses.replace(c, rope_scaling=dataclasses.replace(c.rope_scaling, factor=factor))


MUTANTS = {  # id -> (scratch function replaced, replacement)
    "rope_scaling_missing": ("rope_frequencies", _frequencies(lambda c: dataclasses.replace(c, rope_scaling=None))),
    "rope_factor_32_for_8": ("rope_frequencies", _frequencies(_factor(32.0))),
    "rope_angles_bfloat16": ("rope_freqs_cis", _angles_in(torch.bfloat16)),
    "rope_angles_float16": ("rope_freqs_cis", _angles_in(torch.float16)),
    "rope_theta_10000": ("rope_frequencies", _frequencies(lambda c: dataclasses.replace(c, rope_theta=10000.0))),
}


@pytest.fixture(scope="module")
def long_run(tiny_checkpoint, tmp_path_factory):
    """(run, reference trace): tiny 3.1, ~4100 tokens, bfloat16, layer 0 recorded, with the float64 oracle."""
    ckpt = open_checkpoint(tiny_checkpoint("3.1"))
    run = make_run(ckpt, prompt=long_prompt(ckpt.tokenizer_path, N_TOKENS), dtype="bfloat16", names=NAMES)
    assert len(run.tokens) >= 4000, len(run.tokens)
    reference = tmp_path_factory.mktemp("long-context") / "reference.h5"
    trace(run, builtin("reference"), reference)
    return run, reference


@pytest.mark.parametrize("mutant", MUTANTS)
def test_long_context_bug_is_caught_at_q_rotated_with_its_first_position(long_run, mutant, tmp_path, monkeypatch):
    run, reference = long_run
    target, replacement = MUTANTS[mutant]
    monkeypatch.setattr(scratch, target, replacement)
    trace(run, builtin("scratch"), tmp_path / "mutant.h5")
    c = compare_traces(reference, tmp_path / "mutant.h5")
    r = c.result(Q0)
    assert c.first_divergence == Q0, f"{mutant}: first divergence {c.first_divergence}, expected {Q0}"
    k = c.result("layers.0.attention.heads.0.k_rotated")
    assert not k.passed, f"{mutant}: k_rotated passes ({k.ratio:.3g}x)"
    assert r.first_failing_position is not None and r.blocks, r
    failing = [b for b in r.blocks if b["ratio"] > 1]
    assert failing[0]["positions"][0] <= r.first_failing_position <= failing[0]["positions"][1], (
        r.first_failing_position,
        failing[0],
    )
    print(
        f"{mutant}: {Q0} at {r.ratio:.3g}x the bound (whole tensor {r.rel_l2 / r.bound:.3g}x), first failing position "
        f"{r.first_failing_position} of {len(run.tokens)}"
    )


@pytest.mark.parametrize("impl", ["scratch", f"{EXAMPLE}:forward"], ids=["scratch", "my_llama"])
def test_correct_code_passes_a_long_prompt_in_every_block(long_run, impl, tmp_path):
    run, reference = long_run
    trace(run, resolve(impl), tmp_path / "impl.h5")
    c = compare_traces(reference, tmp_path / "impl.h5")
    worst = max(c.results, key=lambda r: r.ratio)
    assert c.passed, f"{impl}: first divergence {c.first_divergence}"
    assert c.result(Q0).blocks and len(c.result(Q0).blocks) == len(run.tokens) // 256
    print(f"{impl}: {len(c.results)} names pass at {len(run.tokens)} tokens; worst {worst.ratio:.3g} at {worst.name}")
