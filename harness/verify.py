"""`verify`: trace the Hugging Face reference (with its float64 oracle) and an implementation, compare, report.

The implementation is the from-scratch forward unless `impl` names another (`--impl`). Isolated mode feeds each of its
layers the reference's input, so a bug is found in its own layer. `generate` (`--generate N`): a prefill and N decode
steps on both sides, teacher-forced with the reference's greedy tokens, and the implementation's steps also held to
its own no-cache forward over the same tokens.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .blind_spots import BlindSpots, blind_spots
from .compare import Comparison, compare_traces
from .errors import HarnessError
from .files import atomic_path, move_into
from .generation import cache_vs_no_cache, generated_tokens, step_summary, trace_generation, unexplained_disagreements
from .implementation import Forward, Implementation, builtin, resolve
from .progress import phase, quiet_transformers
from .report import REPORT_FILES, write_report
from .run import DEFAULT_PROMPT, Run, check_device, make_run, parse_dtype, trace
from .trace_file import load_trace


@dataclass
class VerifyResult:
    comparison: Comparison
    out: Path
    implementation: str
    trace_path: Path  # the implementation's trace
    reference_token: int | None  # None: a --layers range that ends before the logits
    implementation_token: int | None
    reference_text: str | None
    implementation_text: str | None
    # --generate: each side's greedy tokens (N + 1), per-step summaries, the steps against the no-cache forward
    reference_generated: list[int] = field(default_factory=list)
    implementation_generated: list[int] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    cache_check: list = field(default_factory=list)
    unexplained: list[str] = field(default_factory=list)  # steps whose greedy tokens differ beyond rounding
    replaced: list[str] = field(default_factory=list)  # a previous verify's files removed from `out` first
    blind_spots: BlindSpots | None = None  # the RoPE-scaling bugs this dtype and prompt length cannot see
    batch: list[dict[str, Any]] | None = None  # --prompts: per-sequence summaries (harness/batch_verify.py)
    batch_lines: list[str] = field(default_factory=list)  # what verify prints of a batch

    @property
    def cache_passed(self) -> bool:
        return all(r.passed for r in self.cache_check)

    @property
    def passed(self) -> bool:
        return self.comparison.passed and self.cache_passed

    # the names of the first release, when the implementation was always the scratch forward
    @property
    def scratch_token(self) -> int:
        return self.implementation_token

    @property
    def scratch_text(self) -> str:
        return self.implementation_text


def trace_file(impl: str, suffix: str = "") -> str:
    """`scratch.h5` for the scratch forward (as before `--impl` existed), `implementation.h5` for any other."""
    return ("scratch" if impl == "scratch" else "implementation") + suffix + ".h5"


# Every file a verify writes into its folder: one into the folder of a previous one removes these first, so that the
# folder holds exactly this run's files (never a file of the user's).
VERIFY_FILES = (
    "reference.h5",
    *(trace_file(side, suffix) for side in ("scratch", "other") for suffix in ("", "-nocache")),
    "comparison.json",
    "reference-batched.h5",
    *REPORT_FILES,
)


def verify(
    checkpoint: str | Path,
    *,
    out: str | Path = "verify-out",
    dtype: str = "float32",
    prompt: str = DEFAULT_PROMPT,
    isolated: bool = False,
    device: str = "cpu",
    progress: bool = False,
    impl: str | Forward = "scratch",
    vectorized: bool = False,
    attention: str | None = None,
    generate: int = 0,
    layers: str | tuple[int, int] | None = None,
    prompts: list[str] | None = None,
    padding: str = "left",
    weights_from: str | Path | None = None,
) -> VerifyResult:
    """Trace both sides into `out` (reference.h5, and scratch.h5 or implementation.h5), compare, write
    comparison.json and report.html. Every input is checked before any work. With `generate`, also the
    implementation's no-cache forward (scratch-nocache.h5 or implementation-nocache.h5). `progress`: a bar per phase
    on stderr (harness/progress.py). `layers` ("A:B"): decoder layers A .. B-1 only, isolated: the reference runs
    from the embeddings to layer B - 1, its oracle and the implementation over the range alone (docs/any-size.md)."""
    parse_dtype(dtype)
    check_device(device)
    implementation = _implementation(impl, vectorized, attention, progress)
    out = _out_folder(out)
    isolated = isolated or layers is not None  # a range is judged isolated: each layer on the reference's input
    given = dict(prompt=prompt, dtype=dtype, device=device, isolated=isolated, generate=generate, layers=layers)
    run = make_run(checkpoint, weights_from=weights_from, prompts=prompts, padding=padding, **given)
    if implementation.precheck is not None:  # what the implementation refuses, before the reference's minutes
        implementation.precheck(run.checkpoint, run.dtype, run.device)
    if run.batch is not None:  # --prompts: a padded batch against each sequence alone
        return _batch_result(run, implementation, out, progress)
    with quiet_transformers():
        paths, ref_logits, impl_logits, replaced = _trace_both(run, implementation, out, progress)
    with phase("compare", enabled=progress):
        comparison = compare_traces(paths[0], paths[1], token_text=run.text)
    spots = blind_spots(run.checkpoint.config, run.dtype, len(run.tokens), run.layers.start if run.layers else 0)
    with phase("report", enabled=progress):
        if generate:
            result = _generation_result(run, implementation.name, comparison, out, paths, spots)
        else:
            result = _one_pass_result(
                run, implementation.name, comparison, out, paths[1], ref_logits, impl_logits, spots
            )
    result.replaced = replaced
    return result


def _implementation(impl: str | Forward, vectorized: bool, attention: str | None, progress: bool) -> Implementation:
    """`--impl`, with the scratch forward's own options refused for any other."""
    if vectorized and impl != "scratch":
        raise HarnessError("--vectorized applies to --impl scratch only")
    if attention and impl != "scratch":
        raise HarnessError(f"--attention {attention} applies to --impl scratch only")
    return resolve(impl, vectorized=vectorized, progress=progress, attention=attention)


def _out_folder(out: str | Path) -> Path:
    out = Path(out)
    if not out.parent.is_dir():
        raise HarnessError(f"{out}: parent folder {out.parent} does not exist")
    if out.exists() and not out.is_dir():
        raise HarnessError(f"{out}: exists and is not a folder")
    return out


def _batch_result(run: Run, implementation: Implementation, out: Path, progress: bool) -> VerifyResult:
    from .batch_verify import batch_lines, verify_batch

    with quiet_transformers():
        comparison, sequences, checked, replaced, spots = verify_batch(
            run, implementation, out, progress, trace_file(implementation.name), VERIFY_FILES
        )
    first = sequences[0]
    text = lambda token: None if token is None else run.text(token)  # noqa: E731
    result = VerifyResult(
        comparison,
        out,
        implementation.name,
        out / trace_file(implementation.name),
        first["next_token_reference"],
        first["next_token_implementation"],
        text(first["next_token_reference"]),
        text(first["next_token_implementation"]),
        blind_spots=spots,
        batch=sequences,
        batch_lines=batch_lines(run, implementation.name, sequences, checked) + list(filter(None, [spots.line()])),
    )
    result.replaced = replaced
    return result


def _trace_both(
    run: Run, implementation: Implementation, out: Path, progress: bool
) -> tuple[list[Path], torch.Tensor, torch.Tensor, list[str]]:
    """The reference's trace and the implementation's (and with `run.generate` its no-cache trace): (their paths in
    `out`, both sides' logits, the previous verify's files removed from `out`). Staged beside `out` and moved in only
    when every run succeeded: a failing implementation leaves no file written or changed."""
    traced = trace_generation if run.generate else trace
    names = ["reference.h5", trace_file(implementation.name)]
    names += [trace_file(implementation.name, "-nocache")] if run.generate else []
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as staging:
        staged = [Path(staging) / name for name in names]
        with phase("reference and its float64 oracle", enabled=progress):
            ref_logits = traced(dataclasses.replace(run, isolated=False), builtin("reference"), staged[0])
        with load_trace(staged[0]) as reference, phase(f"implementation {implementation.name}", enabled=progress):
            impl_logits = traced(run, implementation, staged[1], reference=reference)
            fed = reference.tokens
        if run.generate:  # the same implementation, no cache, over the prompt and the decoded tokens
            with phase(f"{implementation.name} without its cache", enabled=progress):
                trace(dataclasses.replace(run, tokens=fed, generate=0), implementation, staged[2])
        replaced = move_into(out, staged, VERIFY_FILES)
    return [out / name for name in names], ref_logits, impl_logits, replaced


def _one_pass_result(
    run: Run,
    implementation: str,
    comparison: Comparison,
    out: Path,
    impl_path: Path,
    ref_logits,
    impl_logits,
    spots: BlindSpots,
) -> VerifyResult:
    """One forward over the prompt: comparison.json, the report, both sides' next token."""
    _write_json(out, _comparison_json(comparison, spots))
    text = run.text
    ref_token, impl_token = (None if x is None else int(x[-1].float().argmax()) for x in (ref_logits, impl_logits))
    mode = "isolated layers" if run.isolated else "end to end"
    mode += f" {run.layers} of {run.layers.n_layers}" if run.layers else ""  # --layers A:B
    notes = [
        f"implementation {implementation}; checkpoint {run.checkpoint.path}, dtype {run.dtype}, {mode}; "
        f"prompt {run.prompt!r} ({len(run.tokens)} tokens)",
        next_token_line(run, implementation, ref_token, impl_token),
        *filter(None, [spots.line()]),
    ]
    write_report(comparison, out, notes=notes)
    texts = (None if token is None else text(token) for token in (ref_token, impl_token))
    return VerifyResult(comparison, out, implementation, impl_path, ref_token, impl_token, *texts, blind_spots=spots)


def next_token_line(run: Run, implementation: str, ref_token: int | None, impl_token: int | None) -> str:
    """Both sides' next token; none when a --layers range ends before the logits."""
    if ref_token is None or impl_token is None:
        return f"next token: none (--layers {run.layers} ends before the logits)"
    text = run.text
    return (
        f"next token: reference {text(ref_token)!r} (id {ref_token}), "
        f"{implementation} {text(impl_token)!r} (id {impl_token})"
    )


def _generation_result(
    run: Run, implementation: str, comparison: Comparison, out: Path, paths: list[Path], spots: BlindSpots
) -> VerifyResult:
    """--generate: per-step results, the cache check and each side's generated text into comparison.json and the
    report."""
    ref_path, impl_path, nocache_path = paths
    with load_trace(ref_path) as ref, load_trace(impl_path) as impl:
        ref_gen, impl_gen = generated_tokens(ref), generated_tokens(impl)
    text = lambda tokens: "".join(map(run.text, tokens))  # noqa: E731
    # reference/implementation token and text: the whole generation (N + 1 greedy tokens), not one next token
    result = VerifyResult(
        comparison,
        out,
        implementation,
        impl_path,
        ref_gen[-1],
        impl_gen[-1],
        text(ref_gen),
        text(impl_gen),
        ref_gen,
        impl_gen,
        step_summary(comparison.results, run.generate),
        cache_vs_no_cache(run, impl_path, nocache_path, ref_path),
        unexplained_disagreements(ref_path, impl_path),  # greedy tokens apart beyond near ties
        blind_spots=spots,
    )
    _write_generation_json(run, result)
    first_cache = next((r.name for r in result.cache_check if not r.passed), None)
    notes = [
        f"implementation {implementation}; checkpoint {run.checkpoint.path}, dtype {run.dtype}; prompt {run.prompt!r} "
        f"({len(run.tokens)} tokens), prefill + {run.generate} decode steps fed the reference's greedy tokens",
        f"generated: reference {result.reference_text!r}, {implementation} {result.implementation_text!r}",
        f"cache against no cache: {'agree' if first_cache is None else 'first disagreement at ' + first_cache}",
        *filter(None, [spots.line()]),
    ]
    write_report(comparison, out, notes=notes, steps=result.steps)
    return result


def _write_generation_json(run: Run, result: VerifyResult) -> None:
    """comparison.json of a generation: the comparison's, with a `generation` section."""
    cache_check = result.cache_check
    data = _comparison_json(result.comparison, result.blind_spots)
    data["generation"] = {
        "steps": run.generate,
        "prompt_tokens": len(run.tokens),
        "teacher_forced": result.comparison.tokens,
        "reference_generated": result.reference_generated,
        "implementation_generated": result.implementation_generated,
        "reference_text": result.reference_text,
        "implementation_text": result.implementation_text,
        "unexplained_disagreements": result.unexplained,
        "per_step": result.steps,
        "cache_vs_no_cache": {
            "passed": all(r.passed for r in cache_check),
            "per_step": step_summary(cache_check, run.generate),
            "failed": [r.name for r in cache_check if not r.passed],
        },
    }
    _write_json(result.out, data)


def _comparison_json(comparison: Comparison, spots: BlindSpots) -> dict[str, Any]:
    """comparison.json's content: the comparison's, and `blind_spots` (harness/blind_spots.py; no classes without
    scaled RoPE)."""
    return {**comparison.to_json(), "blind_spots": spots.to_json()}


def _write_json(out: Path, data: dict[str, Any]) -> None:
    with atomic_path(out / "comparison.json") as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
