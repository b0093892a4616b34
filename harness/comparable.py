"""What two traces must share to be compared, checked before any name is judged: the same checkpoint, tokens and
shapes; dtypes the rule can judge; which side is the reference; and which names are not canonical (misspelled?).
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from . import names as canon
from .bound import UNIT_ROUNDOFF, less_precise
from .errors import HarnessError
from .names import ORACLE_PREFIX
from .trace_file import Trace


def check_comparable(a: Trace, b: Trace, common: list[str]) -> None:
    """Raise HarnessError (exit 2) when the traces are not runs of the same model on the same tokens."""
    ca, cb = a.attrs.get("checkpoint"), b.attrs.get("checkpoint")
    if ca is not None and cb is not None and ca != cb:
        raise HarnessError(f"traces come from different checkpoints: {a.path} has {ca!r}, {b.path} has {cb!r}")
    if "tokens" in a and "tokens" in b and a.tokens != b.tokens:
        ta, tb = a.tokens, b.tokens
        at = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        raise HarnessError(
            f"traces ran different tokens: {a.path} has {len(ta)}, {b.path} has {len(tb)}, "
            f"first difference at position {at}"
        )
    for name in (n for n in a.names if n != "tokens" and canon.split_batch(n)[1] == "tokens" and n in b):
        if a[name].tolist() != b[name].tolist():
            raise HarnessError(f"traces ran different tokens: {name} differs between {a.path} and {b.path}")
    if not common:
        raise HarnessError(f"nothing to compare: {a.path} and {b.path} have no tensor names in common besides 'tokens'")
    for name in common:
        if a.shape(name) != b.shape(name):
            raise HarnessError(
                f"{name!r} has shape {list(a.shape(name))} in {a.path} and {list(b.shape(name))} in {b.path}"
            )
        if a.rows(name) != b.rows(name):
            raise HarnessError(
                f"{name!r}: {a.path} and {b.path} keep different rows of it (traces of other harness versions?)"
            )


def oracle_side(a: Trace, b: Trace) -> tuple[Trace, Trace, bool]:
    """The side holding a float64 oracle is the reference side; B judged. Swapped when only B holds one."""
    if any(n.startswith(ORACLE_PREFIX) for n in a.extra_names):
        return a, b, False
    if any(n.startswith(ORACLE_PREFIX) for n in b.extra_names):
        return b, a, True
    return a, b, False


def check_dtypes(a: Trace, b: Trace, calibrated: bool) -> None:
    """Raise HarnessError (exit 2) when runs of two dtypes are to be compared without an oracle."""
    da, db = a.attrs.get("dtype"), b.attrs.get("dtype")
    if not calibrated and da and db and da != db:
        raise HarnessError(
            f"traces ran in different dtypes ({a.path}: {da}, {b.path}: {db}); without a float64 oracle "
            f"there is no common bound: compare runs of one dtype, or a reference trace with its oracle"
        )


def run_dtype(trace: Trace, names: list[str]) -> str | None:
    """The dtype a trace's run computed in: its `dtype` attribute, else the least precise of its names' (None when no
    known dtype is found)."""
    if (dtype := trace.attrs.get("dtype")) in UNIT_ROUNDOFF:
        return dtype
    known = {trace.dtype(n) for n in names} & set(UNIT_ROUNDOFF)
    return less_precise(*known) if known else None


def check_oracle_dtypes(ref: Trace, impl: Trace, common: list[str]) -> None:
    """Raise HarnessError (exit 2) when B ran in a less precise dtype than the reference side: the reference's floors
    are its own dtype's rounding and say nothing of what a correct B of a coarser dtype shows (a correct bfloat16 B
    failed 52 of 222 names against a float32 reference). A more precise B is judged soundly, at A's sensitivity."""
    da, db = run_dtype(ref, common), run_dtype(impl, common)
    if da is None or db is None or UNIT_ROUNDOFF[db] <= UNIT_ROUNDOFF[da]:
        return
    out = ref.path.with_name(f"reference-{db}.h5")
    raise HarnessError(
        f"{impl.path} ran in {db}, the reference {ref.path} in {da}: a {da} reference's floors are {da} rounding and "
        f"say nothing of the {db} rounding a correct {db} run shows; trace the reference in {db}: "
        f"{reference_command(ref.attrs, db, out)}, then python -m harness compare {shlex.quote(str(out))} "
        f"{shlex.quote(str(impl.path))}"
    )


def reference_command(attrs: dict[str, Any], dtype: str, out: os.PathLike) -> str:
    """The command that traces the reference of the run `attrs` describe (its checkpoint, prompt, generation, device)
    in `dtype` into `out`."""
    from .run import DEFAULT_PROMPT

    checkpoint = attrs.get("checkpoint_path")
    words = ["python -m harness trace", shlex.quote(checkpoint) if isinstance(checkpoint, str) else "CHECKPOINT"]
    words += ["--impl reference --dtype", dtype]
    prompt = attrs.get("prompt")
    if isinstance(prompt, str) and prompt != DEFAULT_PROMPT:
        short = len(prompt) <= 80 and "\n" not in prompt
        words.append(f"--prompt {shlex.quote(prompt)}" if short else "--prompt-file FILE (the same prompt)")
    if isinstance(attrs.get("generate"), int) and attrs["generate"] > 0:
        words.append(f"--generate {attrs['generate']}")
    if attrs.get("device", "cpu") != "cpu":
        words.append(f"--device {attrs['device']}")
    return " ".join([*words, "--out", shlex.quote(str(out))])


def not_canonical(names: list[str], attrs: dict[str, Any]) -> list[str]:
    """The names that are not canonical (README: Canonical names) for the model `attrs` describe, in the order
    given (each once): a misspelled name is judged, or listed as only on one side, but nothing else would say so."""
    n_layers, n_heads = attrs.get("n_layers"), attrs.get("n_heads")
    found = []
    for name in dict.fromkeys(names):
        layer, head, last = canon.parse(name)
        part = canon.part(name)
        level = "head" if head is not None else ("layer" if layer is not None else "model")
        ok = part is not None and part.level == level and (not part.steps_only or canon.split_step(name)[0] is not None)
        ok = ok and not (isinstance(n_layers, int) and layer is not None and layer >= n_layers)
        ok = ok and not (isinstance(n_heads, int) and head is not None and head >= n_heads)
        if not ok:
            found.append(name)
    return found
