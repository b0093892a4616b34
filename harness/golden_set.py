"""A user's golden set: their implementation's trace, verified against the reference once (`record`), then the gate
for later commits (`check`: today's trace against it under cross-machine float noise only, without the reference).

The set's folder, `read` and `write`: harness/golden_format.py. Format, bounds and the workflow: docs/golden.md.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from .checkpoint import Checkpoint, open_checkpoint
from .compare import Comparison, compare_traces, write_json
from .errors import HarnessError
from .golden_format import (
    DESCRIPTION,
    TRACE,
    VERIFICATION,
    GoldenSet,
    bounds_line,
    describe,
    read,
    recipe_text,
    write,
)
from .implementation import Forward, resolve
from .run import DEFAULT_PROMPT, make_run, trace
from .tiny import read_recipe, remake

# ---- record ----------------------------------------------------------------------------------------------------------


@dataclass
class Recorded:
    """`record`'s outcome: the verification against the reference, and the set when it passed (else None)."""

    verification: Any  # harness.verify.VerifyResult
    golden: GoldenSet | None
    checkpoint: Path
    dtype: str


def record(
    golden_dir: str | Path,
    impl: str,
    checkpoint: str | Path,
    *,
    dtype: str = "float32",
    prompt: str = DEFAULT_PROMPT,
    device: str = "cpu",
    progress: bool = False,
) -> Recorded:
    """Verify `impl` against the reference (verify's calibrated rule); when it passes, write its trace as the golden
    set in `golden_dir` (new, empty, or a golden set to rewrite), `golden.json` last. Nothing is written otherwise."""
    from .verify import verify

    golden_dir = Path(golden_dir)
    _check_out(golden_dir)
    ckpt = open_checkpoint(checkpoint)
    tiny = _tiny_recipe(ckpt)
    with tempfile.TemporaryDirectory(prefix=f".{golden_dir.name}.", dir=golden_dir.parent) as staging:
        out = Path(staging) / "verify"
        result = verify(ckpt.path, out=out, dtype=dtype, prompt=prompt, device=device, impl=impl, progress=progress)
        if not result.passed:
            return Recorded(result, None, ckpt.path, dtype)
        golden = write(golden_dir, result, ckpt, tiny=tiny, prompt=prompt, dtype=dtype, device=device)
    return Recorded(result, golden, ckpt.path, dtype)


def _check_out(golden_dir: Path) -> None:
    if not golden_dir.parent.is_dir():
        raise HarnessError(f"{golden_dir}: parent folder {golden_dir.parent} does not exist; create it first")
    if golden_dir.exists() and not golden_dir.is_dir():
        raise HarnessError(f"{golden_dir}: is a file, expected a directory for the golden set")
    if golden_dir.is_dir() and any(golden_dir.iterdir()) and not (golden_dir / DESCRIPTION).is_file():
        raise HarnessError(f"{golden_dir}: exists and is not a golden set (no {DESCRIPTION}); choose a new directory")


def _tiny_recipe(ckpt: Checkpoint) -> dict | None:
    """The checkpoint's make-tiny recipe, checked: the tiny shape is made again here and must match (2 s)."""
    recipe = read_recipe(ckpt.path)
    if recipe is None or recipe["shape"] != "tiny":
        return recipe  # the 8B shapes take minutes and GBs to remake: their fingerprint is checked when remade
    with tempfile.TemporaryDirectory() as tmp:
        if open_checkpoint(remake(recipe, Path(tmp) / "tiny")).fingerprint() != ckpt.fingerprint():
            raise HarnessError(
                f"{ckpt.path}: tiny.json says make-tiny {recipe_text(recipe)}, but that makes another checkpoint "
                f"(fingerprint differs): remove tiny.json, or make the checkpoint again with make-tiny"
            )
    return recipe


# ---- check -----------------------------------------------------------------------------------------------------------


@dataclass
class GoldenCheck:
    """Today's trace against the golden set: the comparison, what was run, and the command that rewrites the set."""

    golden: GoldenSet
    comparison: Comparison
    rewrite_command: str
    trace: Path  # today's trace
    checkpoint: Path  # the checkpoint run
    checkpoint_source: str  # "--checkpoint", "recorded path" or "remade from its make-tiny recipe"

    @property
    def missing(self) -> list[str]:
        """Names of the golden set that today's run did not record."""
        return self.comparison.only_in_a

    @property
    def passed(self) -> bool:
        return self.comparison.passed and not self.missing


def check(
    golden_dir: str | Path,
    impl: str | Forward,
    *,
    checkpoint: str | Path | None = None,
    work_dir: str | Path,
) -> GoldenCheck:
    """Trace `impl` on the set's checkpoint, prompt and dtype into `work_dir` and compare it with the golden trace
    under the set's bounds. The checkpoint: `checkpoint`, else where it was recorded, else its tiny recipe made again
    at `work_dir/tiny` (and kept); its fingerprint must be the set's. Neither the reference nor transformers loads."""
    golden = read(golden_dir)
    implementation = resolve(impl)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt, source = locate_checkpoint(golden, checkpoint, work_dir)
    run = make_run(ckpt, prompt=golden.prompt, dtype=golden.dtype, device=golden.device)
    if run.tokens != golden.tokens:
        raise HarnessError(
            f"{ckpt.path}: its tokenizer gives {len(run.tokens)} tokens for the golden set's prompt, "
            f"{golden.path / DESCRIPTION} records {len(golden.tokens)} (other tokens): not the tokenizer of the set"
        )
    today = work_dir / TRACE
    trace(run, implementation, today)
    comparison = compare_traces(golden.trace, today, rtol=golden.rtol, atol=golden.atol, token_text=run.text)
    write_json(comparison, work_dir / "comparison.json")
    command = rewrite_command(golden, impl if isinstance(impl, str) else golden.implementation, checkpoint, source)
    return GoldenCheck(golden, comparison, command, today, ckpt.path, source)


def locate_checkpoint(golden: GoldenSet, checkpoint: str | Path | None, work_dir: Path) -> tuple[Checkpoint, str]:
    """(the checkpoint, how it was found): `checkpoint` if given, the recorded path if it holds the same checkpoint,
    else the tiny recipe made again (once) at `work_dir/tiny`. The fingerprint must match, whichever it is."""
    if checkpoint is not None:
        return _matching(open_checkpoint(checkpoint), golden, "--checkpoint"), "--checkpoint"
    recorded = Path(golden.checkpoint_path)
    if recorded.is_dir():
        ckpt = open_checkpoint(recorded)
        if ckpt.fingerprint() == golden.checkpoint_fingerprint or golden.tiny is None:
            return _matching(ckpt, golden, "the recorded path"), "recorded path"
    if golden.tiny is None:
        raise HarnessError(
            f"{recorded}: the checkpoint the golden set {golden.path} was recorded on is not there (and it is not a "
            f"make-tiny checkpoint, which could be made again); pass --checkpoint DIR"
        )
    source = "remade from its make-tiny recipe"
    return _matching(open_checkpoint(_remade(golden.tiny, work_dir / "tiny")), golden, source), source


def _matching(ckpt: Checkpoint, golden: GoldenSet, source: str) -> Checkpoint:
    if ckpt.fingerprint() != golden.checkpoint_fingerprint:
        raise HarnessError(
            f"{ckpt.path} ({source}): checkpoint fingerprint {ckpt.fingerprint()[:12]} differs from the golden "
            f"set's {golden.checkpoint_fingerprint[:12]} (recorded on {golden.checkpoint_path}): not the checkpoint "
            f"{golden.path} was recorded on"
        )
    return ckpt


def _remade(recipe: dict, out: Path) -> Path:
    """The tiny checkpoint of `recipe` at `out`, made once (under a file lock) and reused: a CI cache keeps it."""
    with FileLock(str(out.parent / f".{out.name}.lock")):
        if not out.exists():
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
            remake(recipe, tmp / "ckpt")
            os.replace(tmp / "ckpt", out)
            tmp.rmdir()
    return out


def rewrite_command(golden: GoldenSet, impl: str, checkpoint: str | Path | None, source: str) -> str:
    """`python -m harness golden record ...` that rewrites the set from today's implementation (after review)."""
    make = ""
    if checkpoint is None and source == "recorded path":
        checkpoint = golden.checkpoint_path
    elif checkpoint is None:  # remade from its recipe: make it again beside the user's files
        checkpoint = Path(golden.checkpoint_path).name or "tiny"
        make = f"python -m harness make-tiny {shlex.quote(str(checkpoint))} {recipe_text(golden.tiny)} && "
    words = ["python -m harness golden record --impl", shlex.quote(impl), "--checkpoint", shlex.quote(str(checkpoint))]
    words += ["--dtype", golden.dtype]
    words += ["--prompt", shlex.quote(golden.prompt)] if golden.prompt != DEFAULT_PROMPT else []
    words += ["--device", golden.device] if golden.device != "cpu" else []
    return make + " ".join(words + ["--out", shlex.quote(str(golden.path))])


# ---- what the command line prints ------------------------------------------------------------------------------------


def check_lines(result: GoldenCheck) -> list[str]:
    """What `golden check` prints: on a failure the table, the first divergence and the rewrite command."""
    from .report import summary_line, text_report

    c = result.comparison
    lines = [describe(result.golden), f"checkpoint: {result.checkpoint} ({result.checkpoint_source})"]
    lines += [text_report(c)] if not c.passed else [summary_line(c)]
    lines += [bounds_line(result.golden)]
    if result.missing:
        lines.append(f"FAIL: {len(result.missing)} names of the golden set not recorded today: {result.missing[:3]}")
    if c.only_in_b:
        lines.append(f"not judged: {len(c.only_in_b)} names recorded today are not in the golden set")
    if not result.passed:
        lines += [
            "the implementation's numbers changed since the golden set was recorded; if the change is intended, "
            "review it, then rewrite the set (verified against the reference again):",
            f"  {result.rewrite_command}",
            f"today's trace: {result.trace} (`golden check --work-dir DIR` keeps it, for compare and report)",
        ]
    return lines


def record_lines(recorded: Recorded) -> list[str]:
    """What `golden record` prints: the set and its bounds, or why nothing was written."""
    from .report import summary_line, text_report

    v, golden = recorded.verification, recorded.golden
    if golden is None:
        return [
            text_report(v.comparison),
            f"not written: {v.implementation} diverges from the reference, and a golden set records a verified "
            f"implementation; its report: python -m harness verify {shlex.quote(str(recorded.checkpoint))} --impl "
            f"{shlex.quote(v.implementation)} --dtype {recorded.dtype} --out verify-out (docs/debugging.md)",
        ]
    return [
        f"verified against the reference: {summary_line(v.comparison)}",
        describe(golden),
        bounds_line(golden),
        f"wrote {TRACE}, {VERIFICATION} and {DESCRIPTION} to {golden.path}",
    ]


__all__ = [
    "GoldenCheck",
    "GoldenSet",
    "Recorded",
    "bounds_line",
    "check",
    "check_lines",
    "describe",
    "locate_checkpoint",
    "read",
    "record",
    "record_lines",
    "rewrite_command",
    "write",
]
