"""The suite: each canonical name of an implementation (the from-scratch forward unless `--llama3-impl` names
another) against the Hugging Face reference, or against a golden set of it (`--llama3-golden`, no reference run).

Run by the pytest plugin (harness/pytest_plugin.py), parametrized from the checkpoint's config
(`--llama3-checkpoint DIR`, or the bundled tiny ones): layers x heads x names. Each test asserts the verdict of the
one comparison (harness/compare.py) that `verify` or `golden check` prints; a name the implementation does not record
(fused attention: scores, probs) is skipped, naming it.
"""

from __future__ import annotations

import math

import pytest

from harness.names import batch_name, head_name, layer_name, split_step, step_name


def _fmt(x) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) else str(x)


def check(verified, case, name: str) -> None:
    """Assert `name` passed; the failure says by how much, where in the sequence, and where the trace first diverged.
    A name the implementation does not record (fused attention has no scores or probs) is skipped, naming it. In a
    batch (`--llama3-prompts`) the name of every sequence, `batch.{b}.NAME`."""
    run = verified(case)
    if run.error:
        pytest.fail(f"{case.impl} ({case.id}): {run.error}", pytrace=False)
    for each in sequences_of(run, name):
        _check_one(run, case, each)


def sequences_of(run, name: str) -> list[str]:
    """`name`, or in a batch each sequence's `batch.{b}.NAME`."""
    batch = run.summary.get("batch")
    return [name] if not batch else [batch_name(s["sequence"], name) for s in batch]


def _check_one(run, case, name: str) -> None:
    r = run.result(name)
    if r is None:
        _not_compared(run, case, name)
    if r["passed"]:
        return
    first = run.comparison["first_divergence"]
    where = f"token {r['worst_position']}" if r.get("worst_position") is not None else "whole tensor"
    if r.get("worst_token") is not None:
        where += f" ({r['worst_token']!r})"
    lines = [
        f"{name} diverges in {case.impl} ({case.id}): rel_l2 {_fmt(r['rel_l2'])} vs bound {_fmt(r['bound'])} "
        f"(ratio {_fmt(r['ratio'])}"
        + (f", reference's own error {_fmt(r['floor'])}" if r.get("floor") is not None else "")
        + ")",
        f"  max_abs {_fmt(r['max_abs'])}, max_rel {_fmt(r['max_rel'])}, cosine {_fmt(r['cosine'])}; worst at {where}",
    ]
    if r.get("first_failing_position") is not None and r.get("blocks"):
        worst = max(r["blocks"], key=lambda b: b["ratio"])
        lines.append(
            f"  along the prompt: first failing at position {r['first_failing_position']}; worst at positions "
            f"{worst['positions'][0]}-{worst['positions'][1]}, {_fmt(worst['ratio'])}x their bound"
        )
    if r.get("nonfinite"):
        lines.append(f"  non-finite values: {r['nonfinite']}")
    lines.append(
        f"  first divergence in the whole trace: {first}"
        + (
            f"; non-finite values first appear at {run.comparison['first_nonfinite']}"
            if run.comparison.get("first_nonfinite")
            else ""
        )
    )
    pytest.fail("\n".join(lines + _where_to_look(run)), pytrace=False)


def _where_to_look(run) -> list[str]:
    """The traces and the command to run next: compare again, or (a golden set) rewrite the set."""
    if run.case.golden:
        return [
            f"  today's trace: {run.summary['trace']}; golden set {run.summary['golden']}",
            f"  if the change is intended, review it, then rewrite the set: {run.summary['rewrite_command']}",
        ]
    return [
        f"  traces and report: {run.out}; "
        f"rerun: python -m harness compare {run.out / 'reference.h5'} {run.summary['trace']}"
    ]


def _not_compared(run, case, name: str) -> None:
    """Skip a name only the reference recorded, unless the implementation recorded none of the canonical names (the
    harness records the logits it returns); fail one in neither trace. Against a golden set, a name it holds must be
    recorded again, and one it does not hold is skipped."""
    if case.golden:
        if name in run.comparison["only_in_a"]:
            pytest.fail(f"{name}: in the golden set {case.golden}, not recorded by {case.impl} today", pytrace=False)
        pytest.skip(f"the golden set {case.golden} holds no {name} ({case.impl} did not record it)")
    if name not in run.comparison["only_in_a"]:
        pytest.fail(f"{name!r} was not compared (in neither trace?) in {run.out / 'comparison.json'}", pytrace=False)
    recorded = [r["name"] for r in run.comparison["results"] if split_step(r["name"])[1] != "logits"]
    if not recorded:
        pytest.fail(f"{case.impl} ({case.id}) records none of the canonical names but the logits", pytrace=False)
    pytest.skip(f"{case.impl} does not record {name} (fused attention records no scores or probs)")


def _in_step(step: int | None, name: str) -> str:
    return name if step is None else step_name(step, name)


def _each_step(case) -> list[int | None]:
    """Where a name outside the layers is checked: once, or in every step of a generation (`--llama3-generate`)."""
    return list(range(case.generate + 1)) if case.generate else [None]


def test_head(verified, head_case):
    case, layer, head, part, step = head_case
    check(verified, case, _in_step(step, head_name(layer, head, part)))


def test_layer(verified, layer_case):
    case, layer, part, step = layer_case
    check(verified, case, _in_step(step, layer_name(layer, part)))


def test_embeddings(verified, case):
    for step in _each_step(case):
        check(verified, case, _in_step(step, "embeddings"))


def test_final_norm(verified, case):
    for step in _each_step(case):
        check(verified, case, _in_step(step, "norm"))


def test_logits(verified, case):
    """Logits within bound; in one forward pass also the same top-1 token at (nearly) every position. In a generation
    each step's logits are judged by their bound alone, as `verify --generate` judges them: whether the greedy tokens
    agree, a near tie explained by the float64 oracle, is test_next_token's (the same rule, harness/generation.py)."""
    if case.generate or case.golden:  # a golden set's verdict is its bounds' too (harness/golden_set.py)
        for step in _each_step(case):
            check(verified, case, _in_step(step, "logits"))
        return
    check(verified, case, "logits")
    for name in sequences_of(verified(case), "logits"):
        metrics = verified(case).result(name)["logits"]
        assert metrics is not None, f"no {name} metrics in comparison.json"
        disagree = [i for i, same in enumerate(metrics["top1"]) if not same]
        assert not disagree or case.dtype != "float32", f"{name}: top-1 differs at positions {disagree} in float32"
        assert metrics["top1_rate"] >= 0.8, f"{name}: top-1 agreement {metrics['top1_rate']:.0%} ({disagree})"
        assert math.isfinite(metrics["kl_max"])


def test_next_token(verified, case):
    """The notebook's "42" moment: both implementations predict the same next token. In a generation (each side fed
    the reference's tokens): the same greedy token at every step unless a near tie explains it, and the cache path
    agrees with the implementation's own no-cache forward."""
    if case.golden:
        pytest.skip(f"against the golden set {case.golden} the logits are judged by their bound (test_logits)")
    s = verified(case).summary
    if s.get("batch"):  # each sequence's next token, from the batched logits at its last real token
        if case.generate:
            pytest.skip("a batch's decode steps are judged name by name (no cache against no-cache check for batches)")
        apart = [b for b in s["batch"] if b["next_token_reference"] != b["next_token_implementation"]]
        assert not apart, f"next token differs in sequences {[b['sequence'] for b in apart]}"
        return
    if not case.generate:
        assert s["reference_token"] == s["impl_token"], (
            f"next token: reference {s['reference_text']!r} (id {s['reference_token']}), "
            f"{s['impl']} {s['impl_text']!r} (id {s['impl_token']})"
        )
        return
    generation = verified(case).comparison["generation"]
    assert not generation["unexplained_disagreements"], (  # a near tie may go the other way in bfloat16
        f"generated: reference {s['reference_text']!r}, {s['impl']} {s['impl_text']!r}: "
        + "; ".join(generation["unexplained_disagreements"])
    )
    cache = generation["cache_vs_no_cache"]
    assert cache["passed"], (
        f"{case.impl} with its KV cache disagrees with its own no-cache forward, first at "
        f"{cache['failed'][0]} ({len(cache['failed'])} names)"
    )
