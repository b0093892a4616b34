"""`verify`: trace the Hugging Face reference (with its float64 oracle) and an implementation, compare, report.

The implementation is the from-scratch forward unless `impl` names another (`--impl`). Isolated mode feeds each of its
layers the reference's input, so a bug is found in its own layer. `generate` (`--generate N`): a prefill and N decode
steps on both sides, teacher-forced with the reference's greedy tokens, and the implementation's steps also held to
its own no-cache forward over the same tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .compare import Comparison, compare_traces, write_json
from .errors import HarnessError
from .files import atomic_path
from .generation import cache_vs_no_cache, generated_tokens, step_summary, trace_generation, unexplained_disagreements
from .implementation import Forward, builtin, resolve
from .report import write_report
from .run import DEFAULT_PROMPT, check_device, make_run, parse_dtype, trace
from .trace_file import load_trace


@dataclass
class VerifyResult:
    comparison: Comparison
    out: Path
    implementation: str
    trace_path: Path  # the implementation's trace
    reference_token: int
    implementation_token: int
    reference_text: str
    implementation_text: str
    # --generate: each side's greedy tokens (N + 1), per-step summaries, the steps against the no-cache forward
    reference_generated: list[int] = field(default_factory=list)
    implementation_generated: list[int] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    cache_check: list = field(default_factory=list)

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
    generate: int = 0,
) -> VerifyResult:
    """Trace both sides into `out` (reference.h5, and scratch.h5 or implementation.h5), compare, write
    comparison.json and report.html. Every input is checked before any work. With `generate`, also the
    implementation's no-cache forward (scratch-nocache.h5 or implementation-nocache.h5)."""
    parse_dtype(dtype)
    check_device(device)
    if vectorized and impl != "scratch":
        raise HarnessError("--vectorized applies to --impl scratch only")
    implementation = resolve(impl, vectorized=vectorized, progress=progress)
    out = Path(out)
    if not out.parent.is_dir():
        raise HarnessError(f"{out}: parent folder {out.parent} does not exist")
    if out.exists() and not out.is_dir():
        raise HarnessError(f"{out}: exists and is not a folder")
    run = make_run(checkpoint, prompt=prompt, dtype=dtype, device=device, isolated=isolated, generate=generate)
    reference_run = dataclasses.replace(run, isolated=False)
    ref_path, impl_path = out / "reference.h5", out / trace_file(implementation.name)
    # both traces are staged beside `out` and moved in only when both succeeded: a failing implementation leaves no
    # file written or changed
    traced = trace_generation if generate else trace
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as staging:
        staged_ref, staged_impl = Path(staging) / ref_path.name, Path(staging) / impl_path.name
        ref_logits = traced(reference_run, builtin("reference"), staged_ref)
        with load_trace(staged_ref) as reference:
            impl_logits = traced(run, implementation, staged_impl, reference=reference)
            fed = reference.tokens
        staged = [(staged_ref, ref_path), (staged_impl, impl_path)]
        if generate:  # the same implementation, no cache, over the prompt and the decoded tokens
            nocache_path = out / trace_file(implementation.name, "-nocache")
            staged.append((Path(staging) / nocache_path.name, nocache_path))
            trace(dataclasses.replace(run, tokens=fed, generate=0), implementation, staged[-1][0])
        out.mkdir(exist_ok=True)
        for source, target in staged:
            os.replace(source, target)

    comparison = compare_traces(ref_path, impl_path, token_text=run.text)
    text = run.text
    if not generate:
        write_json(comparison, out / "comparison.json")
        ref_token, impl_token = int(ref_logits[-1].float().argmax()), int(impl_logits[-1].float().argmax())
        notes = [
            f"implementation {implementation.name}; checkpoint {run.checkpoint.path}, dtype {dtype}, "
            f"{'isolated layers' if isolated else 'end to end'}; prompt {prompt!r} ({len(run.tokens)} tokens)",
            f"next token: reference {text(ref_token)!r} (id {ref_token}), "
            f"{implementation.name} {text(impl_token)!r} (id {impl_token})",
        ]
        write_report(comparison, out, notes=notes)
        return VerifyResult(
            comparison, out, implementation.name, impl_path, ref_token, impl_token, text(ref_token), text(impl_token)
        )
    return _generation_result(run, implementation.name, comparison, out, impl_path, nocache_path)


def _generation_result(
    run, implementation: str, comparison, out: Path, impl_path: Path, nocache_path: Path
) -> VerifyResult:
    """--generate: per-step results, the cache check and each side's generated text into comparison.json and the
    report."""
    with load_trace(out / "reference.h5") as ref, load_trace(impl_path) as impl:
        ref_gen, impl_gen = generated_tokens(ref), generated_tokens(impl)
    cache_check = cache_vs_no_cache(run, impl_path, nocache_path, out / "reference.h5")
    unexplained = unexplained_disagreements(out / "reference.h5", impl_path)  # greedy tokens apart beyond near ties
    steps = step_summary(comparison.results, run.generate)
    cache_steps = step_summary(cache_check, run.generate)
    text = run.text
    data = comparison.to_json()
    data["generation"] = {
        "steps": run.generate,
        "prompt_tokens": len(run.tokens),
        "teacher_forced": comparison.tokens,
        "reference_generated": ref_gen,
        "implementation_generated": impl_gen,
        "reference_text": "".join(map(text, ref_gen)),
        "implementation_text": "".join(map(text, impl_gen)),
        "unexplained_disagreements": unexplained,
        "per_step": steps,
        "cache_vs_no_cache": {
            "passed": all(r.passed for r in cache_check),
            "per_step": cache_steps,
            "failed": [r.name for r in cache_check if not r.passed],
        },
    }
    with atomic_path(out / "comparison.json") as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    first_cache = next((r.name for r in cache_check if not r.passed), None)
    notes = [
        f"implementation {implementation}; checkpoint {run.checkpoint.path}, dtype {run.dtype}; prompt {run.prompt!r} "
        f"({len(run.tokens)} tokens), prefill + {run.generate} decode steps fed the reference's greedy tokens",
        f"generated: reference {''.join(map(text, ref_gen))!r}, {implementation} {''.join(map(text, impl_gen))!r}",
        f"cache against no cache: {'agree' if first_cache is None else 'first disagreement at ' + first_cache}",
    ]
    write_report(comparison, out, notes=notes, steps=steps)
    # reference/implementation token and text: the whole generation (N + 1 greedy tokens), not one next token
    return VerifyResult(
        comparison,
        out,
        implementation,
        impl_path,
        ref_gen[-1],
        impl_gen[-1],
        "".join(map(text, ref_gen)),
        "".join(map(text, impl_gen)),
        ref_gen,
        impl_gen,
        steps,
        cache_check,
    )
