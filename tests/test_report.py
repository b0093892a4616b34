"""harness/report.py: the text table `compare` prints, its summary and first-divergence lines, the head the report
draws, report.html with its plots, and the lines `verify --generate` prints; on small hand-written traces."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harness import record, tracing
from harness.compare import compare_traces
from harness.errors import HarnessError
from harness.report import (
    describe_divergence,
    divergent_head,
    generation_lines,
    heat_value,
    summary_line,
    text_report,
    write_report,
)

TOKENS = [1, 5, 7, 2]
T = len(TOKENS)
PROBS = "layers.0.attention.heads.1.probs"


def write_trace(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A bare trace through the public recording API: the tokens, then the given names in order."""
    with tracing(path):
        record("tokens", torch.tensor(TOKENS))
        for name, value in tensors.items():
            record(name, value)
    return path


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    """Embeddings, one head's causal probs and the residual stream of two layers, in forward order."""
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(T, T, generator=g, dtype=torch.float64).masked_fill(torch.ones(T, T).triu(1) > 0, -torch.inf)
    return {
        "embeddings": torch.randn(T, 8, generator=g, dtype=torch.float64),
        PROBS: probs.softmax(-1),
        "layers.0.output": torch.randn(T, 8, generator=g, dtype=torch.float64),
        "layers.1.output": torch.randn(T, 8, generator=g, dtype=torch.float64),
    }


def compared(tmp_path: Path, a: dict, b: dict):
    return compare_traces(write_trace(tmp_path / "a.h5", a), write_trace(tmp_path / "b.h5", b))


def test_identical_traces_summarise_as_a_pass(tmp_path, tensors):
    c = compared(tmp_path, tensors, tensors)
    assert summary_line(c) == "PASS: 4/4 names within bound, fixed bound against A; largest ratio 0 at embeddings"
    assert describe_divergence(c) == "first divergence: none"
    assert [heat_value(r) for r in c.results] == [r.ratio for r in c.results] == [0.0] * 4  # no oracle: error/bound


def test_the_table_marks_failures_and_ends_with_the_divergence_and_the_summary(tmp_path, tensors):
    """layers.1.output doubled: the only failure, first in the table (worst ratio first), marked `!`."""
    c = compared(tmp_path, tensors, {**tensors, "layers.1.output": 2 * tensors["layers.1.output"]})
    lines = text_report(c).splitlines()
    assert lines[:2] == [f"A (reference side): {tmp_path / 'a.h5'}", f"B: {tmp_path / 'b.h5'}"]
    rows = [line for line in lines if line.startswith(("embeddings", "layers."))]
    assert [row.split()[0] for row in rows] == ["layers.1.output", "embeddings", PROBS, "layers.0.output"]
    assert [row.split()[4].endswith("!") for row in rows] == [True, False, False, False]  # the ratio column
    assert lines[-2:] == [describe_divergence(c), summary_line(c)]
    assert describe_divergence(c).startswith("first divergence: layers.1.output: rel_l2 1 > bound ")
    assert summary_line(c).startswith("FAIL: 3/4 names within bound, fixed bound against A; largest ratio ")


def test_a_head_divergence_names_its_layer_and_head(tmp_path, tensors):
    c = compared(tmp_path, tensors, {**tensors, PROBS: tensors[PROBS].flip(0)})
    assert describe_divergence(c).startswith(f"first divergence: {PROBS} (layer 0, head 1): rel_l2 ")
    assert divergent_head(c) == (0, 1)


def test_the_head_drawn_is_the_first_failing_one_else_the_worst_probs(tmp_path, tensors):
    assert divergent_head(compared(tmp_path, tensors, tensors)) == (0, 1)  # the only probs, passing
    no_heads = {k: v for k, v in tensors.items() if k != PROBS}
    assert divergent_head(compared(tmp_path, no_heads, no_heads)) is None


def test_the_report_refuses_a_missing_folder(tmp_path, tensors):
    c = compared(tmp_path, tensors, tensors)
    with pytest.raises(HarnessError, match=f"{tmp_path / 'nope'}: report folder does not exist"):
        write_report(c, tmp_path / "nope")


def test_the_report_page_holds_the_verdict_the_plots_and_the_worst_names(tmp_path, tensors):
    c = compared(tmp_path, tensors, {**tensors, PROBS: tensors[PROBS].flip(0)})
    (tmp_path / "r").mkdir()
    page = write_report(c, tmp_path / "r", title="my check", notes=["a note"]).read_text()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "attention.png",
        "depth.png",
        "heads.png",
        "report.html",
    ]
    assert '<h1>my check: <span class="fail">FAIL</span></h1>' in page and "<p>a note</p>" in page
    assert page.count("<tr") == 1 + 4 and page.count('<tr class="fail">') == 1  # the header, then every name
    assert "Attention probabilities, layer 0 head 1 (first divergent head): A, B and B - A." in page


def test_generation_lines_say_each_step_the_cache_check_and_the_texts():
    passing = SimpleNamespace(name="steps.1.logits", passed=True)
    failing = SimpleNamespace(name="steps.2.layers.0.output", passed=False, rel_l2=0.5, bound=0.01)
    result = SimpleNamespace(
        steps=[
            dict(step=0, first_divergence=None, passed=10, names=10, worst_ratio=0.25),
            dict(step=1, first_divergence="steps.1.logits", passed=9, names=10, worst_ratio=3.0),
        ],
        cache_check=[passing, failing],
        reference_text=" the",
        implementation="scratch",
        implementation_text=" a",
    )
    assert generation_lines(result) == [
        "",
        "per step (0: prefill):",
        "  step   0 ok   10/10 names, worst ratio 0.25",
        "  step   1 FAIL 9/10 names, first divergence steps.1.logits",
        "cache against no cache: 1/2 names agree; first disagreement steps.2.layers.0.output (rel_l2 0.5 > 0.01)",
        "generated (greedy, each side from the same teacher-forced inputs): reference ' the', scratch ' a'",
    ]
