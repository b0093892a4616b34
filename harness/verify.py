"""`verify`: trace the Hugging Face reference (with its float64 oracle) and an implementation, compare, report.

The implementation is the from-scratch forward unless `impl` names another (`--impl`). Isolated mode feeds each of its
layers the reference's input, so a bug is found in its own layer.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .compare import Comparison, compare_traces, write_json
from .errors import HarnessError
from .implementation import Forward, builtin, resolve
from .report import write_report
from .runner import DEFAULT_PROMPT, check_device, make_run, parse_dtype, trace
from .tracing import load_trace


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

    @property
    def passed(self) -> bool:
        return self.comparison.passed

    # the names of the first release, when the implementation was always the scratch forward
    @property
    def scratch_token(self) -> int:
        return self.implementation_token

    @property
    def scratch_text(self) -> str:
        return self.implementation_text


def trace_file(impl: str) -> str:
    """`scratch.h5` for the scratch forward (as before `--impl` existed), `implementation.h5` for any other."""
    return "scratch.h5" if impl == "scratch" else "implementation.h5"


def verify(checkpoint: str | Path, *, out: str | Path = "verify-out", dtype: str = "float32", prompt: str = DEFAULT_PROMPT,
           isolated: bool = False, device: str = "cpu", progress: bool = False, impl: str | Forward = "scratch",
           vectorized: bool = False) -> VerifyResult:
    """Trace both sides into `out` (reference.h5, and scratch.h5 or implementation.h5), compare, write
    comparison.json and report.html. Every input is checked before any work."""
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
    run = make_run(checkpoint, prompt=prompt, dtype=dtype, device=device, isolated=isolated)
    reference_run = dataclasses.replace(run, isolated=False)
    ref_path, impl_path = out / "reference.h5", out / trace_file(implementation.name)
    # both traces are staged beside `out` and moved in only when both succeeded: a failing implementation leaves no
    # file written or changed
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as staging:
        staged_ref, staged_impl = Path(staging) / ref_path.name, Path(staging) / impl_path.name
        ref_logits = trace(reference_run, builtin("reference"), staged_ref)
        with load_trace(staged_ref) as reference:
            impl_logits = trace(run, implementation, staged_impl, reference=reference)
        out.mkdir(exist_ok=True)
        os.replace(staged_ref, ref_path)
        os.replace(staged_impl, impl_path)

    comparison = compare_traces(ref_path, impl_path, token_text=run.text)
    write_json(comparison, out / "comparison.json")
    ref_token, impl_token = int(ref_logits[-1].float().argmax()), int(impl_logits[-1].float().argmax())
    text = run.text
    notes = [f"implementation {implementation.name}; checkpoint {run.checkpoint.path}, dtype {dtype}, "
             f"{'isolated layers' if isolated else 'end to end'}; prompt {prompt!r} ({len(run.tokens)} tokens)",
             f"next token: reference {text(ref_token)!r} (id {ref_token}), {implementation.name} {text(impl_token)!r} (id {impl_token})"]  # fmt: skip
    write_report(comparison, out, notes=notes)
    return VerifyResult(comparison, out, implementation.name, impl_path, ref_token, impl_token, text(ref_token), text(impl_token))
