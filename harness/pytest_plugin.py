"""The Llama-3 layer x head suite as a pytest plugin (entry point `llama3`), for any implementation.

After `pip install llama3-harness`, in any repository and with no test files of its own:
`pytest -n auto --llama3-impl my_llama.py:forward --llama3-checkpoint ~/Meta-Llama-3-8B` runs `test_head[layer3-head7-
q_rotated]`, ... (harness/suite.py) for that implementation; without `--llama3-checkpoint`, on the bundled tiny ones.
Layers and heads come from the checkpoint's own config. Traces are computed once per session, shared by xdist workers.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

OPTIONS = {  # option: (environment variable, help)
    "checkpoint": (
        "LLAMA3_CHECKPOINT",
        "Meta or Hugging Face Llama-3 checkpoint directory (default: the bundled tiny ones)",
    ),
    "impl": ("LLAMA3_IMPL", "implementation to verify: scratch (default), MODULE:ATTR or path/to/file.py:ATTR"),
    "dtype": (
        "LLAMA3_DTYPE",
        "working dtype(s), comma-separated (default: float32,bfloat16 on tiny; bfloat16 with a checkpoint)",
    ),
    "prompt": ("LLAMA3_PROMPT", "prompt after <|begin_of_text|> (default: the notebook's)"),
    "prompt_file": ("LLAMA3_PROMPT_FILE", "the prompt is this UTF-8 file's text, as it is (long prompts)"),
    "isolated": ("LLAMA3_ISOLATED", "feed each layer of the implementation the reference's input to it"),
    "trace_dir": ("LLAMA3_TRACE_DIR", "keep traces, comparison.json and report.html here for `compare` and plots"),
    "generate": (
        "LLAMA3_GENERATE",
        "N: a prefill and N decode steps with a KV cache, tests per step (step3-layer1-head2-scores)",
    ),
}
SUITE = Path(__file__).with_name("suite.py")


def _in_this_checkout() -> bool:
    """pytest run inside the harness's own source checkout: there the short spellings (--checkpoint ...) work too."""
    root = Path(__file__).resolve().parent.parent
    return (
        (root / "tests").is_dir() and (root / "pyproject.toml").is_file() and Path.cwd().resolve().is_relative_to(root)
    )


def pytest_addoption(parser):
    parser.addini("llama3_suite", type="bool", default=False, help="run the Llama-3 suite with the testpaths")
    group = parser.getgroup("llama3", "Llama-3 verification harness (llama3-harness)")
    short = _in_this_checkout()
    for name, (env, help_text) in OPTIONS.items():
        flag = name.replace("_", "-")
        flags = [f"--llama3-{flag}"] + ([f"--{flag}"] if short else [])
        if name == "isolated":
            group.addoption(
                *flags, dest=f"llama3_{name}", action="store_true", default=None, help=f"{help_text} (env {env}=1)"
            )
        else:
            group.addoption(*flags, dest=f"llama3_{name}", default=None, help=f"{help_text} (env {env})")


def option(config, name: str):
    """An option's value: the command line, else its environment variable, else None."""
    value = config.getoption(f"llama3_{name}")
    if value is None:
        value = os.environ.get(OPTIONS[name][0]) or None
        if name == "isolated" and value is not None:
            value = value not in ("0", "false", "no")
    return value


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    """pytest picks its rootdir (and so its ini file and conftest.py) from the command line before a plugin's options
    are known: `--llama3-checkpoint DIR` makes DIR look like a test path. Pick it again without our options' values."""
    ns = early_config.known_args_namespace
    ours = [getattr(ns, f"llama3_{name}", None) for name in OPTIONS]
    if not any(isinstance(v, str) and Path(v).exists() for v in ours) or ns.rootdir or ns.inifilename:
        return
    from _pytest.config.findpaths import determine_setup

    kwargs = dict(
        inifile=None,
        override_ini=ns.override_ini,
        args=ns.file_or_dir,
        rootdir_cmd_arg=None,
        invocation_dir=early_config.invocation_params.dir,
    )
    accepted = inspect.signature(determine_setup).parameters
    rootpath, inipath, inicfg, *_ = determine_setup(**{k: v for k, v in kwargs.items() if k in accepted})
    if rootpath == early_config.rootpath and inipath == early_config.inipath:
        return  # the values misled nothing (given with `=`, or beside the project anyway)
    early_config._rootpath, early_config._inipath, early_config._inicfg = rootpath, inipath, inicfg
    early_config._inicache.clear()
    parser.extra_info.update(rootdir=str(rootpath), inifile=str(inipath))
    ns.confcutdir = str(inipath.parent if inipath else rootpath)
    addopts = early_config._validate_args(early_config.getini("addopts"), "via addopts config") if inipath else []
    if addopts:
        args[:] = addopts + args
        early_config.pluginmanager.consider_preparse(addopts, exclude_only=False)
        early_config.known_args_namespace = parser.parse_known_args(args, namespace=copy.copy(early_config.option))
        early_config.known_args_namespace.confcutdir = ns.confcutdir


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


def suite_cases(config) -> list[Case]:
    from harness.implementation import resolve
    from harness.run import parse_dtype

    explicit = option(config, "dtype")
    checkpoint = option(config, "checkpoint")
    impl = option(config, "impl") or "scratch"
    dtypes = (explicit or ("bfloat16" if checkpoint else "float32,bfloat16")).split(",")
    for d in dtypes:
        parse_dtype(d)
    generate = _generate(option(config, "generate"))
    resolved = resolve(impl)  # a bad --llama3-impl is a usage error now, not a thousand red tests
    suite_prompt(config)  # and so is a missing prompt file
    if generate:
        from harness.implementation import decoder

        decoder(resolved)  # and one without the decode contract too
    if checkpoint:
        from harness.checkpoint import open_checkpoint

        c = open_checkpoint(checkpoint).config
        return [Case(d, d, c.n_layers, c.n_heads, checkpoint=checkpoint, impl=impl, generate=generate) for d in dtypes]
    from harness.tiny import VARIANTS

    return [
        Case(
            f"tiny{v}-{d}",
            d,
            VARIANTS[v]["n_layers"],
            VARIANTS[v]["n_heads"],
            tiny=(v, 0),
            impl=impl,
            generate=generate,
        )
        for v in VARIANTS
        for d in dtypes
    ]


def suite_prompt(config) -> str:
    from harness.run import DEFAULT_PROMPT, read_prompt_file

    if option(config, "prompt") is not None and option(config, "prompt_file") is not None:
        raise pytest.UsageError("--llama3-prompt and --llama3-prompt-file are exclusive: give one")
    return (
        read_prompt_file(option(config, "prompt_file"))
        if option(config, "prompt_file")
        else option(config, "prompt") or DEFAULT_PROMPT
    )


def _generate(value) -> int:
    from harness.errors import HarnessError

    try:
        n = int(value or 0)
    except ValueError:
        raise HarnessError(f"--llama3-generate {value}: expected a number of decode steps") from None
    if n < 0:
        raise HarnessError(f"--llama3-generate {value}: expected a number of decode steps, 0 or more")
    return n


def _suite_requested(config) -> bool:
    """The suite joins the collection when an implementation or a checkpoint is named on the command line, or when the
    ini option `llama3_suite` is set and pytest runs its `testpaths` (no paths given: this repository's `pytest`)."""
    if config.getoption("llama3_impl") is not None or config.getoption("llama3_checkpoint") is not None:
        return True
    return bool(config.getini("llama3_suite")) and config.args_source == pytest.Config.ArgsSource.TESTPATHS


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    from harness.errors import HarnessError

    if hasattr(config, "workerinput"):  # an xdist worker: one torch thread each, so N workers use N cores, not N^2
        import torch

        torch.set_num_threads(1)
    try:
        config._llama3_cases = suite_cases(config)
    except HarnessError as e:
        raise pytest.UsageError(str(e)) from None
    if _suite_requested(config) and SUITE not in {Path(a.split("::")[0]).resolve() for a in config.args}:
        config.args.append(str(SUITE))


def pytest_report_header(config):
    cases = getattr(config, "_llama3_cases", [])
    impl = cases[0].impl if cases else "scratch"
    return [
        f"llama3 harness: {impl} against Hugging Face, {len(cases)} case(s): "
        + ", ".join(f"{c.id} ({c.n_layers} layers x {c.n_heads} heads)" for c in cases)
    ]


def _prefix(cases: list[Case], case: Case) -> str:
    return f"{case.id}-" if len(cases) > 1 else ""


def _steps(case: Case) -> list[int | None]:
    """A generation's steps (0: the prefill), or [None] for one forward pass."""
    return list(range(case.generate + 1)) if case.generate else [None]


def _step_id(step: int | None) -> str:
    return "" if step is None else f"step{step}-"


def pytest_generate_tests(metafunc):
    from harness.names import head_parts, layer_parts

    cases = metafunc.config._llama3_cases
    if "head_case" in metafunc.fixturenames:
        params = [
            (c, layer, head, part, step)
            for c in cases
            for step in _steps(c)
            for layer in range(c.n_layers)
            for head in range(c.n_heads)
            for part in head_parts(in_step=step is not None)  # a step's heads also hold the cache they attend
        ]
        ids = [
            f"{_prefix(cases, c)}{_step_id(step)}layer{layer}-head{head}-{part}"
            for c, layer, head, part, step in params
        ]
        metafunc.parametrize("head_case", params, ids=ids)
    if "layer_case" in metafunc.fixturenames:
        parts = layer_parts()
        params = [
            (c, layer, part, step) for c in cases for step in _steps(c) for layer in range(c.n_layers) for part in parts
        ]
        ids = [f"{_prefix(cases, c)}{_step_id(step)}layer{layer}-{part}" for c, layer, part, step in params]
        metafunc.parametrize("layer_case", params, ids=ids)
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


# ---- computed once per session, by whichever worker gets there first -------------------------------------------------


def _session_id(config) -> str:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        return workerinput["testrunuid"]
    if not hasattr(config, "_llama3_run_id"):
        config._llama3_run_id = uuid.uuid4().hex
    return config._llama3_run_id


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, worker_id) -> Path:
    """A folder every xdist worker of this session sees: the session's base temp, not a worker's own."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


@dataclass
class Verified:
    """A case's verify run: the comparison as JSON (results by name) and where its traces are."""

    case: Case
    out: Path
    comparison: dict
    summary: dict

    def result(self, name: str) -> dict:
        if not hasattr(self, "_by_name"):  # each of the thousand tests asks for one name
            self._by_name = {r["name"]: r for r in self.comparison["results"]}
        if name in self._by_name:
            return self._by_name[name]
        raise AssertionError(f"{name!r} was not compared (only in one trace?) in {self.out / 'comparison.json'}")


@pytest.fixture(scope="session")
def verified(request, shared_dir):
    """`verified(case)`: trace reference + scratch, compare, once per session for all workers (under a file lock)."""
    from filelock import FileLock

    from harness.tiny import make_tiny_once

    config = request.config
    keep = option(config, "trace_dir")
    root = Path(keep) if keep else shared_dir / "llama3-traces"
    root.mkdir(parents=True, exist_ok=True)
    session = _session_id(config)
    cache: dict[str, Verified] = {}

    def get(case: Case) -> Verified:
        if case.id in cache:
            return cache[case.id]
        out = root / case.id
        with FileLock(str(root / f".{case.id}.lock")):
            summary_path = out / "summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            if summary.get("session") != session:
                from harness.files import atomic_path
                from harness.verify import verify

                checkpoint = case.checkpoint or make_tiny_once(shared_dir / "tiny", *case.tiny)
                result = verify(
                    checkpoint,
                    out=out,
                    dtype=case.dtype,
                    prompt=suite_prompt(config),
                    isolated=bool(option(config, "isolated")),
                    impl=case.impl,
                    generate=case.generate,
                )
                summary = dict(
                    session=session,
                    impl=case.impl,
                    trace=str(result.trace_path),
                    reference_token=result.reference_token,
                    impl_token=result.implementation_token,
                    reference_text=result.reference_text,
                    impl_text=result.implementation_text,
                    checkpoint=str(checkpoint),
                    reference_generated=result.reference_generated,
                    impl_generated=result.implementation_generated,
                )
                with atomic_path(summary_path) as tmp:
                    tmp.write_text(json.dumps(summary))
        comparison = json.loads((out / "comparison.json").read_text())
        cache[case.id] = Verified(case, out, comparison, summary)
        return cache[case.id]

    return get


def pytest_collection_modifyitems(config, items):
    """Keep each shared computation's tests on one xdist worker (`--dist loadgroup`), so that workers compute
    different cases side by side instead of waiting on each other's file lock."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        group = None
        for key in ("head_case", "layer_case", "case"):
            if key in params:
                value = params[key]
                group = (value[0] if isinstance(value, tuple) else value).id
        if group is None:
            group = getattr(item.module, "XDIST_GROUP", None)
            if callable(group):
                group = group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
