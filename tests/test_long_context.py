"""Long prompts: at ~4100 tokens in bfloat16, the RoPE bugs that a short prompt hides are caught at q_rotated, with the
first position where they leave the floor, and correct code (ours, and a notebook-style forward recording through the
bare API) passes.

Tiny 3.1 (Llama 3.1 RoPE scaling, factor 8; head_dim 16, so 8 rotation frequencies, 4 of them scaled). Only layer 0
is recorded (every name of it): the bugs sit in its RoPE, and the first divergence must be there, not later. The
reference is traced once per session; the bugs are tests/mutants.py LONG_CONTEXT.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.checkpoint import open_checkpoint
from harness.compare import compare_traces
from harness.implementation import builtin, resolve
from harness.run import make_run, trace
from harness.tiny import CORPUS
from harness.tokenizer import load_tokenizer
from tests.helpers import compute_once
from tests.mutants import LONG_CONTEXT, Q0

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("long-context")]  # one ~4100-token reference with its oracle

N_TOKENS = 4100
NAMES = ["embeddings", "layers.0.*"]
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "my_llama.py"


def long_prompt(tokenizer_path: Path, n_tokens: int) -> str:
    """The tiny corpus, repeated, cut to about n_tokens - 1 tokens (BOS makes n_tokens)."""
    enc = load_tokenizer(tokenizer_path)
    text = CORPUS.read_text(encoding="utf-8")
    ids = enc.encode(text * (1 + 2 * n_tokens // len(enc.encode(text))))[: n_tokens - 1]
    return enc.decode(ids)


@pytest.fixture(scope="session")
def long_run(tiny_checkpoint, tmp_path_factory, worker_id):
    """(run, reference trace): tiny 3.1, ~4100 tokens, bfloat16, layer 0 recorded, with the float64 oracle; traced
    once per session (tests/helpers.py `compute_once`)."""
    ckpt = open_checkpoint(tiny_checkpoint("3.1"))
    run = make_run(ckpt, prompt=long_prompt(ckpt.tokenizer_path, N_TOKENS), dtype="bfloat16", names=NAMES)
    assert len(run.tokens) >= 4000, len(run.tokens)

    def compute(folder: Path) -> str:
        trace(run, builtin("reference"), folder / "reference.h5")
        return str(folder / "reference.h5")

    return run, Path(compute_once(tmp_path_factory, worker_id, "long-context-reference", compute))


@pytest.mark.parametrize("mutant", LONG_CONTEXT, ids=[m.id for m in LONG_CONTEXT])
def test_long_context_bug_is_caught_at_q_rotated_with_its_first_position(long_run, mutant, tmp_path, monkeypatch):
    run, reference = long_run
    mutant.apply(monkeypatch, run.checkpoint.config)
    trace(run, builtin("scratch"), tmp_path / "mutant.h5")
    c = compare_traces(reference, tmp_path / "mutant.h5")
    r = c.result(Q0)
    assert c.first_divergence == Q0, f"{mutant.id}: first divergence {c.first_divergence}, expected {Q0}"
    k = c.result("layers.0.attention.heads.0.k_rotated")
    assert not k.passed, f"{mutant.id}: k_rotated passes ({k.ratio:.3g}x)"
    assert r.first_failing_position is not None and r.blocks, r
    failing = [b for b in r.blocks if b["ratio"] > 1]
    assert failing[0]["positions"][0] <= r.first_failing_position <= failing[0]["positions"][1], (
        r.first_failing_position,
        failing[0],
    )
    print(
        f"{mutant.id}: {Q0} at {r.ratio:.3g}x the bound (whole tensor {r.rel_l2 / r.bound:.3g}x), "
        f"first failing position "
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
