"""`verify --prompts FILE --padding left|right`: the truth (the reference with its float64 oracle on each sequence
alone), the implementation on the padded batch, and Hugging Face's model on the same padded batch as a check of the
reference itself; per-sequence verdicts, one comparison, one report.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import names as canon
from .batch_run import check_batched, trace_batched, trace_batched_generation, trace_truth
from .blind_spots import blind_spots
from .compare import Comparison, NameResult, compare_traces
from .files import atomic_path, move_into
from .implementation import Implementation, builtin
from .progress import phase
from .report import write_report
from .run import Run
from .trace_file import load_trace

REFERENCE_BATCHED = "reference-batched.h5"  # Hugging Face on the padded batch, judged against the truth


def verify_batch(
    run: Run, implementation: Implementation, out: Path, progress: bool, impl_file: str, previous: tuple[str, ...]
):
    """Trace, compare and report a batch into `out`; returns (the comparison, per-sequence summaries, the batched
    reference's check or None, the files of a previous verify (`previous`: their names) that this one replaced, the
    blind spots of its longest sequence)."""
    if implementation.name != "reference":
        check_batched(implementation)  # before the reference's minutes, not after
    names = ["reference.h5", impl_file] + ([REFERENCE_BATCHED] if _checks_reference(run, implementation) else [])
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as staging:
        staged = [Path(staging) / name for name in names]
        with phase("reference on each sequence alone, with its float64 oracle", enabled=progress):
            truth_logits = trace_truth(run, builtin("reference"), staged[0])
        with phase(f"implementation {implementation.name}, batched", enabled=progress):
            if run.generate:
                with load_trace(staged[0]) as truth:
                    impl_logits = trace_batched_generation(run, implementation, staged[1], reference=truth)
            else:
                impl_logits = trace_batched(run, implementation, staged[1])
        if len(staged) > 2:
            with phase("Hugging Face on the padded batch", enabled=progress):
                trace_batched(run, builtin("reference", oracle=False), staged[2])
        replaced = move_into(out, staged, previous)
    paths = [out / name for name in names]
    with phase("compare", enabled=progress):
        comparison = compare_traces(paths[0], paths[1], token_text=run.text)
        checked = compare_traces(paths[0], paths[2]) if len(paths) > 2 else None
    sequences = sequence_summaries(run, comparison.results, truth_logits, impl_logits)
    spots = blind_spots(run.checkpoint.config, run.dtype, run.batch.width)  # the longest sees the most
    data = {**comparison.to_json(), "batch": batch_json(run, sequences, checked), "blind_spots": spots.to_json()}
    with atomic_path(out / "comparison.json") as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    with phase("report", enabled=progress):
        notes = batch_lines(run, implementation.name, sequences, checked) + list(filter(None, [spots.line()]))
        write_report(comparison, out, notes=notes)
    return comparison, sequences, checked, replaced, spots


def _checks_reference(run: Run, implementation: Implementation) -> bool:
    """Hugging Face on the padded batch is traced beside a one-forward run of another implementation (as the
    implementation itself, `--impl reference` is that check)."""
    return not run.generate and implementation.name != "reference"


def sequence_summaries(
    run: Run, results: list[NameResult], truth_logits: list[torch.Tensor], impl_logits: torch.Tensor | None
) -> list[dict[str, Any]]:
    """Per sequence: its tokens, names judged and passed, first divergence, worst ratio, both sides' next token (the
    batched logits' row at the sequence's last real prompt token)."""
    batch, out = run.batch, []
    for b, ids in enumerate(batch.sequences):
        mine = [r for r in results if canon.split_batch(r.name)[0] == b]
        failed = [r for r in mine if not r.passed]
        worst = max(mine, key=lambda r: r.ratio, default=None)
        last = batch.real_columns(b)[-1]
        ref_next = int(truth_logits[b][len(ids) - 1].float().argmax())
        impl_next = None if impl_logits is None else int(impl_logits[b, last].float().argmax())
        out.append(
            dict(
                sequence=b,
                tokens=len(ids),
                padded=batch.width - len(ids),
                names=len(mine),
                passed=len(mine) - len(failed),
                first_divergence=failed[0].name if failed else None,
                worst=worst.name if worst else None,
                worst_ratio=worst.ratio if worst else None,
                next_token_reference=ref_next,
                next_token_implementation=impl_next,
            )
        )
    return out


def batch_json(run: Run, sequences: list[dict[str, Any]], checked: Comparison | None) -> dict[str, Any]:
    """comparison.json's `batch` section."""
    return {
        "padding": run.batch.padding,
        "pad_id": run.batch.pad_id,
        "width": run.batch.width,
        "generate": run.generate,
        "sequences": sequences,
        "reference_batched": None if checked is None else _check_json(checked),
    }


def _check_json(c: Comparison) -> dict[str, Any]:
    worst = max(c.results, key=lambda r: r.ratio, default=None)
    return {
        "passed": c.passed,
        "names": len(c.results),
        "first_divergence": c.first_divergence,
        "worst": worst.name if worst else None,
        "worst_ratio": worst.ratio if worst else None,
    }


def batch_lines(run: Run, implementation: str, sequences: list[dict[str, Any]], checked: Comparison | None) -> list:
    """What verify prints (and the report shows) of a batch: how it ran, each sequence, the reference's own check."""
    batch, text = run.batch, run.text
    mode = f", {run.generate} decode steps teacher-forced per sequence" if run.generate else ""
    lines = [
        f"batched: {batch.size} sequences of {', '.join(str(s['tokens']) for s in sequences)} tokens, "
        f"{batch.padding}-padded to {batch.width}{mode}; {implementation} ran the padded batch at once, each "
        f"sequence judged at its real positions against the reference on it alone (with its float64 oracle)"
    ]
    for s in sequences:
        verdict = "PASS" if s["first_divergence"] is None else f"FAIL at {s['first_divergence']}"
        nxt = ""
        if s["next_token_implementation"] is not None:
            nxt = (
                f"; next token: reference {text(s['next_token_reference'])!r}, "
                f"{implementation} {text(s['next_token_implementation'])!r}"
            )
        ratio = "" if s["worst_ratio"] is None else f", largest ratio {s['worst_ratio']:.3g}"
        lines.append(
            f"  sequence {s['sequence']} ({_count(s['tokens'], 'token')}, {_count(s['padded'], 'pad')}): {verdict} "
            f"{s['passed']}/{s['names']}{ratio}{nxt}"
        )
    if checked is not None:
        c = _check_json(checked)
        verdict = "PASS" if c["passed"] else f"FAIL at {c['first_divergence']}"
        lines.append(
            f"reference check: Hugging Face on the same padded batch against each sequence alone: {verdict} "
            f"{c['names']} names (its modules' outputs), largest ratio {c['worst_ratio']:.3g}"
        )
    return lines


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")
