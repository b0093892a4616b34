"""The tiny checkpoints are *sensitive*: every bug of tests/mutants.py FORWARD changes the next-token prediction.

This is how the weight scales of harness/tiny.py were checked: with random weights at the usual 0.02 scale many of
these bugs hide under rounding; with the tiny checkpoints' scales each one moves the predicted token.
"""

from __future__ import annotations

import pytest
import torch

from harness import scratch
from harness.checkpoint import open_checkpoint
from harness.run import DEFAULT_PROMPT, prompt_tokens
from tests.mutants import FORWARD

# Bugs the next token cannot show on a 17-token prompt; compare catches each at its own name (tests/test_mutations.py).
INVISIBLE = {
    "positions_from_1": "RoPE is relative: shifting every position by one leaves every score unchanged",
    "gelu": "GELU and SiLU differ by under 0.1 over the gate's range; too little to move the token here",
}
VISIBLE = [m for m in FORWARD if m.id not in INVISIBLE]


def next_token(ckpt, dtype=torch.float32) -> int:
    with torch.inference_mode():
        return int(scratch.forward(ckpt, prompt_tokens(ckpt, DEFAULT_PROMPT), dtype=dtype)[-1].argmax())


@pytest.mark.parametrize("variant", ["3.0", "3.1", "3.2"])
@pytest.mark.parametrize("mutant", VISIBLE, ids=[m.id for m in VISIBLE])
def test_every_bug_changes_the_next_token(tiny_checkpoint, monkeypatch, mutant, variant):
    ckpt = open_checkpoint(tiny_checkpoint(variant))
    correct = next_token(ckpt)
    mutant.apply(monkeypatch, ckpt.config)
    mutated = next_token(ckpt)
    assert mutated != correct, f"{mutant.bug}: next token still {correct} on tiny {variant}"


def test_invisible_bugs_are_the_stated_ones(tiny_checkpoint, monkeypatch):
    """The exceptions above are still exceptions: if one starts moving the token, move it back into VISIBLE."""
    ckpt = open_checkpoint(tiny_checkpoint("3.0"))
    correct = next_token(ckpt)
    for mutant in FORWARD:
        if mutant.id in INVISIBLE:
            with monkeypatch.context() as m:
                mutant.apply(m, ckpt.config)
                assert next_token(ckpt) == correct, f"{mutant.id} now changes the next token: list it as visible"
