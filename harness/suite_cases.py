"""The suite's cases: the plugin's options read once (`SuiteOptions`), the (checkpoint, dtype) cases they name, checked
before any test runs (`check_inputs`), and each case's verify run computed once per session for every worker.

harness/pytest_plugin.py imports this module only when the suite is asked for; harness/suite.py holds the tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from .batch import read_prompts
from .errors import HarnessError
from .files import atomic_path
from .run import DEFAULT_PROMPT, make_run, parse_dtype, parse_layers, read_prompt_file
from .trace_file import load_trace

if TYPE_CHECKING:
    from .golden_set import GoldenSet

GOLDEN_FIXES = (
    "dtype",
    "prompt",
    "prompt_file",
    "isolated",
    "generate",
    "layers",
    "prompts",
    "padding",
)  # a golden set's own, not options


@dataclass(frozen=True)
class SuiteOptions:
    """The plugin's options (`--llama3-*`, else `LLAMA3_*`), parsed once."""

    impl: str = "scratch"
    checkpoint: str | None = None
    dtypes: tuple[str, ...] = ()  # empty: float32,bfloat16 on tiny; bfloat16 with a checkpoint
    prompt: str = DEFAULT_PROMPT
    isolated: bool = False
    trace_dir: str | None = None
    generate: int = 0  # decode steps after the prefill (--llama3-generate)
    golden: GoldenSet | None = None  # --llama3-golden: the set read (harness/golden_set.py); no reference run
    layers: str | None = None  # --llama3-layers A:B: those decoder layers only, isolated
    prompts: tuple[str, ...] | None = None  # --llama3-prompts FILE: a padded batch (harness/batch.py)
    padding: str = "left"  # --llama3-padding


def read_options(value: Callable[[str], Any]) -> SuiteOptions:
    """`value(name)` -> the option's string (True for `isolated`), or None when not given."""
    if value("prompt") is not None and value("prompt_file") is not None:
        raise HarnessError("--llama3-prompt and --llama3-prompt-file are exclusive: give one")
    if value("prompts") is not None and (value("prompt") is not None or value("prompt_file") is not None):
        raise HarnessError("--llama3-prompts with --llama3-prompt(-file): give a batch or one prompt")
    if value("padding") not in (None, "left", "right"):
        raise HarnessError(f"--llama3-padding {value('padding')}: expected left or right")
    golden = None
    if value("golden") is not None:
        fixed = [f"--llama3-{n.replace('_', '-')}" for n in GOLDEN_FIXES if value(n) is not None]
        if fixed:
            raise HarnessError(
                f"--llama3-golden {value('golden')}: the golden set fixes the run; drop {', '.join(fixed)}"
            )
        from .golden_set import read

        golden = read(value("golden"))
    dtypes = tuple(value("dtype").split(",")) if value("dtype") else ()
    for dtype in dtypes:
        parse_dtype(dtype)
    prompt = read_prompt_file(value("prompt_file")) if value("prompt_file") else value("prompt") or DEFAULT_PROMPT
    return SuiteOptions(
        impl=value("impl") or (golden.implementation if golden else "scratch"),
        checkpoint=value("checkpoint"),
        dtypes=dtypes,
        prompt=prompt,
        isolated=bool(value("isolated")),
        trace_dir=value("trace_dir"),
        generate=_generate(value("generate")),
        golden=golden,
        layers=value("layers"),
        prompts=tuple(read_prompts(value("prompts"))) if value("prompts") else None,
        padding=value("padding") or "left",
    )


def _generate(value: str | None) -> int:
    try:
        n = int(value or 0)
    except ValueError:
        raise HarnessError(f"--llama3-generate {value}: expected a number of decode steps") from None
    if n < 0:
        raise HarnessError(f"--llama3-generate {value}: expected a number of decode steps, 0 or more")
    return n


@dataclass(frozen=True)
class Case:
    """One (checkpoint, dtype) the suite verifies; `tiny` is (variant, seed) for a bundled tiny checkpoint."""

    id: str
    dtype: str
    n_layers: int
    n_heads: int
    checkpoint: str | None = None
    tiny: tuple[str, int] | None = None
    impl: str = "scratch"
    generate: int = 0  # decode steps after the prefill (--llama3-generate)
    golden: str | None = None  # judged against this golden set (--llama3-golden) instead of a reference run
    layers: tuple[int, int] | None = None  # --llama3-layers A:B: decoder layers A .. B-1 only

    @property
    def layer_indices(self) -> range:
        """The decoder layers the case tests."""
        return range(*self.layers) if self.layers else range(self.n_layers)


def suite_cases(options: SuiteOptions) -> list[Case]:
    """The cases the options name: each dtype on the checkpoint or on every bundled tiny variant; a golden set's."""
    if options.golden:
        golden = options.golden
        with load_trace(golden.trace) as trace:
            n_layers, n_heads = trace.attrs["n_layers"], trace.attrs["n_heads"]
        return [
            Case(
                golden.dtype,
                golden.dtype,
                n_layers,
                n_heads,
                options.checkpoint,
                impl=options.impl,
                golden=str(golden.path),
            )
        ]
    common = dict(impl=options.impl, generate=options.generate)
    if options.checkpoint:
        from .checkpoint import open_checkpoint

        c = open_checkpoint(options.checkpoint).config
        dtypes = options.dtypes or ("bfloat16",)
        layers = _layers(options, c.n_layers)
        return [
            Case(d, d, c.n_layers, c.n_heads, checkpoint=options.checkpoint, layers=layers, **common) for d in dtypes
        ]
    from .tiny import VARIANTS

    return [
        Case(
            f"tiny{v}-{d}",
            d,
            VARIANTS[v]["n_layers"],
            VARIANTS[v]["n_heads"],
            tiny=(v, 0),
            layers=_layers(options, VARIANTS[v]["n_layers"]),
            **common,
        )
        for v in VARIANTS
        for d in options.dtypes or ("float32", "bfloat16")
    ]


def _layers(options: SuiteOptions, n_layers: int) -> tuple[int, int] | None:
    """`--llama3-layers A:B` checked against a model of `n_layers` (one line, a usage error, when outside it)."""
    if options.layers is None:
        return None
    if options.generate:
        raise HarnessError("--llama3-layers with --llama3-generate: a layer range covers one forward pass")
    judged = parse_layers(options.layers, n_layers)
    return judged.start, judged.stop


def check_inputs(options: SuiteOptions, cases: list[Case], tiny_root: Path | None) -> None:
    """Everything a verify run of each case would refuse, refused now, once (a usage error, not a thousand red
    tests): the implementation and its decode contract, and each checkpoint's run (its tokenizer, the prompt's length,
    --isolated with --generate). Tiny checkpoints are made under `tiny_root`, where the runs will find them."""
    from .implementation import decoder, resolve

    implementation = resolve(options.impl)
    if options.generate:
        decoder(implementation)
    if options.golden:  # the set read, its checkpoint found (fingerprint, tokens): harness/golden_set.py's rules
        from .golden_set import locate_checkpoint

        golden = options.golden
        ckpt, _ = locate_checkpoint(golden, options.checkpoint, tiny_root)
        make_run(ckpt, prompt=golden.prompt, dtype=golden.dtype, device=golden.device)
        return
    checked = set()
    for case in cases:  # each checkpoint once (its dtypes share it), the first refusal before the next is made
        checkpoint = checkpoint_of(case, tiny_root)
        if checkpoint not in checked:
            make_run(
                checkpoint,
                prompt=options.prompt,
                dtype=case.dtype,
                isolated=options.isolated,
                generate=options.generate,
                prompts=options.prompts,
                padding=options.padding,
            )
            checked.add(checkpoint)


def checkpoint_of(case: Case, tiny_root: Path) -> str:
    """The case's checkpoint folder: the one named, or its tiny one made under `tiny_root` (once)."""
    if case.checkpoint:
        return case.checkpoint
    from .tiny import make_tiny_once

    return str(make_tiny_once(tiny_root, *case.tiny))


# ---- computed once per session, by whichever worker gets there first -------------------------------------------------


@dataclass
class Verified:
    """A case's verify run: the comparison as JSON (results by name) and where its traces are; `error` when the run
    itself failed (the implementation raised, recorded nothing, ...): every test of the case then fails with it."""

    case: Case
    out: Path
    comparison: dict
    summary: dict
    _by_name: dict[str, dict] = field(default_factory=dict, init=False, repr=False)

    @property
    def error(self) -> str | None:
        return self.summary.get("error")

    def result(self, name: str) -> dict | None:
        """The comparison's result for `name`; None when it was not compared."""
        if not self._by_name:  # each of the thousand tests asks for one name
            self._by_name = {r["name"]: r for r in self.comparison.get("results", [])}
        return self._by_name.get(name)


def verified_once(case: Case, options: SuiteOptions, *, root: Path, session: str, tiny_root: Path) -> Verified:
    """The case's run under `root / case.id`: computed by the first process of this session to ask (under a file
    lock), read by the others. A run that fails is recorded as failed, not retried by each test."""
    out = root / case.id
    with FileLock(str(root / f".{case.id}.lock")):
        summary_path = out / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if summary.get("session") != session:
            out.mkdir(parents=True, exist_ok=True)
            try:
                summary = _run(case, options, out, tiny_root)
            except HarnessError as e:
                summary = dict(impl=case.impl, error=str(e))
            summary["session"] = session
            with atomic_path(summary_path) as tmp:
                tmp.write_text(json.dumps(summary))
    comparison_path = out / "comparison.json"
    comparison = json.loads(comparison_path.read_text()) if "error" not in summary else {}
    return Verified(case, out, comparison, summary)


def _run(case: Case, options: SuiteOptions, out: Path, tiny_root: Path) -> dict:
    """Verify the case into `out` (or check it against its golden set); what the tests need besides comparison.json."""
    if case.golden:
        return _run_golden(case, out)
    from .verify import verify

    checkpoint = checkpoint_of(case, tiny_root)
    result = verify(
        checkpoint,
        out=out,
        dtype=case.dtype,
        prompt=options.prompt,
        isolated=options.isolated,
        impl=case.impl,
        generate=case.generate,
        layers=case.layers,
        prompts=options.prompts,
        padding=options.padding,
    )
    return dict(
        batch=result.batch,
        impl=case.impl,
        trace=str(result.trace_path),
        reference_token=result.reference_token,
        impl_token=result.implementation_token,
        reference_text=result.reference_text,
        impl_text=result.implementation_text,
        checkpoint=checkpoint,
        reference_generated=result.reference_generated,
        impl_generated=result.implementation_generated,
    )


# ---- a golden set (--llama3-golden): today's trace against it, no reference ----------------------------------------


def _run_golden(case: Case, out: Path) -> dict:
    """harness/golden_set.py's `check` into `out` (today's trace, comparison.json, a tiny checkpoint made again)."""
    from .golden_set import check

    result = check(case.golden, case.impl, checkpoint=case.checkpoint, work_dir=out)
    return dict(
        impl=case.impl,
        trace=str(result.trace),
        golden=str(result.golden.path),
        rewrite_command=result.rewrite_command,
        checkpoint=f"{result.checkpoint} ({result.checkpoint_source})",
    )
