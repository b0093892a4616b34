"""A user's golden set on disk: the folder's format (`golden.json`, `implementation.h5`, `verification.json`), `read`
(its trace checked against the recorded sha256) and `write` (from a passed verification, `golden.json` last).

The two jobs on it, `record` and `check`, are harness/golden_set.py's. Format, bounds and the workflow: docs/golden.md.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .errors import HarnessError
from .files import atomic_path
from .golden import GOLDEN_ATOL, GOLDEN_RTOL, sha256
from .trace_file import FORMAT_VERSION, READABLE_VERSIONS, library_versions

DESCRIPTION = "golden.json"
TRACE = "implementation.h5"
VERIFICATION = "verification.json"
FORMAT = "llama3-harness golden set"
SET_VERSION = 1
BOUNDS_SOURCE = "harness/golden.py GOLDEN_RTOL/GOLDEN_ATOL; measured: docs/golden.md#the-bounds"


@dataclass(frozen=True)
class GoldenSet:
    """What `golden.json` says: the checkpoint (fingerprint, path, tiny recipe), the run, the bounds, the versions."""

    path: Path
    implementation: str  # the --impl it was recorded with
    implementation_sha256: str | None  # of the file, for path/to/file.py:ATTR
    checkpoint_path: str
    checkpoint_fingerprint: str
    checkpoint_format: str
    tiny: dict | None  # make-tiny's (variant, seed, format, shape), when the checkpoint is a tiny one
    prompt: str
    tokens: list[int]
    dtype: str
    device: str
    rtol: float
    atol: float
    library_versions: dict[str, str]
    recorded: str
    machine: str
    trace_sha256: str
    verification: dict[str, Any] = field(default_factory=dict)

    @property
    def trace(self) -> Path:
        return self.path / TRACE


def read(golden_dir: str | Path) -> GoldenSet:
    """The golden set at `golden_dir`, its trace checked against the sha256 `golden.json` records."""
    golden_dir = Path(golden_dir)
    path = golden_dir / DESCRIPTION
    if not path.is_file():
        what = "no such directory" if not golden_dir.is_dir() else f"no {DESCRIPTION}"
        raise HarnessError(
            f"{golden_dir}: not a golden set ({what}); record one with `python -m harness golden record --impl "
            f"FILE.py:forward --checkpoint DIR --out {golden_dir}` (docs/golden.md)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT or data.get("format_version") != SET_VERSION:
            raise ValueError(f"format {data.get('format')!r} version {data.get('format_version')}")
        ckpt, run, bounds = data["checkpoint"], data["run"], data["bounds"]
        golden = GoldenSet(
            golden_dir,
            data["implementation"]["spec"],
            data["implementation"].get("sha256"),
            ckpt["path"],
            ckpt["fingerprint"],
            ckpt["format"],
            ckpt.get("tiny"),
            run["prompt"],
            [int(t) for t in run["tokens"]],
            run["dtype"],
            run.get("device", "cpu"),
            float(bounds["rtol"]),
            float(bounds["atol"]),
            data.get("library_versions", {}),
            data.get("recorded", ""),
            data.get("machine", ""),
            data["trace"]["sha256"],
            data.get("verification", {}),
        )
        trace_version = data["trace"].get("format_version")
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # json's error is a ValueError
        raise HarnessError(f"{path}: not a valid golden set ({type(e).__name__}: {e})") from None
    if trace_version not in READABLE_VERSIONS:
        raise HarnessError(f"{path}: its trace is format {trace_version}, this harness reads {READABLE_VERSIONS}")
    if not golden.trace.is_file():
        raise HarnessError(f"{golden.trace}: missing from the golden set")
    if sha256(golden.trace) != golden.trace_sha256:
        raise HarnessError(f"{golden.trace}: sha256 differs from {DESCRIPTION} (changed outside `golden record`)")
    return golden


def write(
    golden_dir: Path, verification, ckpt: Checkpoint, *, tiny: dict | None, prompt: str, dtype: str, device: str
) -> GoldenSet:
    """The set from a passed verification: its implementation's trace and comparison.json moved in, golden.json
    last (a set rewritten half-way fails `read`'s sha256 check, never passes a check)."""
    description = _description(verification, ckpt, tiny, prompt=prompt, dtype=dtype, device=device)
    golden_dir.mkdir(exist_ok=True)
    os.replace(verification.trace_path, golden_dir / TRACE)
    os.replace(verification.out / "comparison.json", golden_dir / VERIFICATION)
    with atomic_path(golden_dir / DESCRIPTION) as target:
        slot = f"tokens {uuid.uuid4()}"  # the tokens on one line, however many: a slot no other string can be
        tokens, description["run"]["tokens"] = description["run"]["tokens"], slot
        text = json.dumps(description, indent=1).replace(json.dumps(slot), json.dumps(tokens))
        target.write_text(text + "\n", encoding="utf-8")
    return read(golden_dir)


def _description(result, ckpt: Checkpoint, tiny: dict | None, *, prompt: str, dtype: str, device: str) -> dict:
    """golden.json: everything `check` needs, and what a reader needs to trust the set."""
    comparison = result.comparison
    where = result.implementation.rsplit(":", 1)[0]
    worst = max(comparison.results, key=lambda r: r.ratio)
    return {
        "format": FORMAT,
        "format_version": SET_VERSION,
        "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "implementation": {
            "spec": result.implementation,
            "sha256": sha256(Path(where)) if where.endswith(".py") else None,
        },
        "checkpoint": {
            "path": str(ckpt.path.resolve()),
            "fingerprint": ckpt.fingerprint(),
            "format": ckpt.format,
            "tiny": tiny,
        },
        "run": {"prompt": prompt, "tokens": comparison.tokens, "dtype": dtype, "device": device},
        "bounds": {
            "rtol": GOLDEN_RTOL[dtype],
            "atol": GOLDEN_ATOL[dtype],
            "rule": "per name: ||today - golden|| / ||golden|| <= rtol + atol * sqrt(n) / ||golden||",
            "source": BOUNDS_SOURCE,
        },
        "trace": {"file": TRACE, "sha256": sha256(result.trace_path), "format_version": FORMAT_VERSION},
        "verification": {
            "against": "the Hugging Face reference and its float64 oracle (python -m harness verify)",
            "passed": comparison.passed,
            "names": len(comparison.results),
            "largest_ratio": worst.ratio,
            "at": worst.name,
            "file": VERIFICATION,
        },
        "library_versions": library_versions(),
    }


# ---- what the command line prints about a set ------------------------------------------------------------------------


def recipe_text(recipe: dict) -> str:
    """make-tiny's flags for a recipe: `--variant 3.1 --seed 0` (and `--format`, `--shape` when not the default)."""
    text = f"--variant {recipe['variant']} --seed {recipe['seed']}"
    text += f" --format {recipe['format']}" if recipe["format"] != "meta" else ""
    return text + (f" --shape {recipe['shape']}" if recipe["shape"] != "tiny" else "")


def describe(golden: GoldenSet) -> str:
    where = f"tiny {recipe_text(golden.tiny)}" if golden.tiny else golden.checkpoint_path
    return (
        f"golden set {golden.path}: {golden.implementation}, {golden.dtype}, {len(golden.tokens)} tokens, checkpoint "
        f"{where}; recorded {golden.recorded} on {golden.machine or 'an unnamed machine'}, verified against the "
        f"reference (largest ratio {golden.verification.get('largest_ratio', float('nan')):.3g})"
    )


def bounds_line(golden: GoldenSet) -> str:
    return (
        f"bound per name: rel_l2 <= {golden.rtol:g} + {golden.atol:g} x sqrt(n) / ||golden|| ({golden.dtype}; "
        f"cross-machine float noise only: docs/golden.md#the-bounds)"
    )
