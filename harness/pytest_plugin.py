"""The Llama-3 layer x head suite as a pytest plugin (entry point `llama3`), for any implementation.

After `pip install llama3-harness`, in any repository and with no test files of its own:
`pytest -n auto --llama3-impl my_llama.py:forward --llama3-checkpoint ~/Meta-Llama-3-8B` runs `test_head[layer3-head7-
q_rotated]`, ... (harness/suite.py) for that implementation; without `--llama3-checkpoint`, on the bundled tiny ones.
pytest loads this module in every project of the environment, so it imports nothing heavy and prints nothing until the
suite is asked for; the work is harness/suite_cases.py's. Private pytest API used here: docs/pytest-plugin.md.
"""

from __future__ import annotations

import copy
import inspect
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .suite_cases import Case, SuiteOptions

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
    "golden": (
        "LLAMA3_GOLDEN",
        "a golden set's folder: judge the implementation against it, without running the reference",
    ),
    "layers": (
        "LLAMA3_LAYERS",
        "A:B: test decoder layers A .. B-1 only, isolated (the reference runs from the embeddings to layer B-1)",
    ),
    "prompts": (
        "LLAMA3_PROMPTS",
        "a batch: one prompt per line, or a JSON list; run padded at once, each name tested in every sequence",
    ),
    "padding": ("LLAMA3_PADDING", "with --llama3-prompts: left (default) or right"),
}
SUITE = Path(__file__).with_name("suite.py")
NAMING = ("impl", "checkpoint", "golden")  # naming one of these asks for the suite


@dataclass
class SuiteState:
    """What this process knows of the suite: the options, the cases, and the tiny checkpoints' folder when the
    controller made them (checking the inputs); `made_here`: this process removes that folder at the end."""

    options: SuiteOptions
    cases: list[Case]
    run_id: str  # one per session, the same in every xdist worker
    tiny_root: Path | None = None
    made_here: bool = False


STATE = pytest.StashKey[SuiteState]()


def pytest_addoption(parser):
    parser.addini("llama3_suite", type="bool", default=False, help="run the Llama-3 suite with the testpaths")
    group = parser.getgroup("llama3", "Llama-3 verification harness (llama3-harness)")
    short = suite_project(Path.cwd())
    for name, (env, help_text) in OPTIONS.items():
        flag = name.replace("_", "-")
        flags = [f"--llama3-{flag}"] + ([f"--{flag}"] if short else [])
        if name == "isolated":
            group.addoption(
                *flags, dest=f"llama3_{name}", action="store_true", default=None, help=f"{help_text} (env {env}=1)"
            )
        else:
            group.addoption(*flags, dest=f"llama3_{name}", default=None, help=f"{help_text} (env {env})")


def suite_project(folder: Path) -> bool:
    """Whether pytest starts inside a project whose pyproject.toml sets `llama3_suite = true` (this repository): there
    the short spellings (--checkpoint, --impl, ...) are registered too. Options are registered before pytest reads
    its ini file (pytest_load_initial_conftests), so the nearest pyproject.toml with a [tool.pytest] table is read."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pytest depends on tomli before 3.11
        import tomli as tomllib
    for parent in (folder, *folder.parents):
        path = parent / "pyproject.toml"
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8")).get("tool", {}).get("pytest")
        except (OSError, ValueError):
            continue
        if table is not None:
            return str(table.get("ini_options", table).get("llama3_suite", "")).lower() in ("true", "1")
    return False


def option(config, name: str):
    """An option's value: the command line, else its environment variable, else None."""
    value = config.getoption(f"llama3_{name}")
    if value is None:
        value = os.environ.get(OPTIONS[name][0]) or None
        if name == "isolated" and value is not None:
            value = value not in ("0", "false", "no")
    return value


def suite_requested(config) -> bool:
    """The suite joins the collection when an implementation, a checkpoint or a golden set is named (an option or its
    environment variable), or when the ini option `llama3_suite` is set and pytest runs its `testpaths` (no paths
    given: this repository's `pytest`)."""
    if any(option(config, name) is not None for name in NAMING):
        return True
    return bool(config.getini("llama3_suite")) and config.args_source == pytest.Config.ArgsSource.TESTPATHS


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    """pytest picks its rootdir (and so its ini file and conftest.py) from the command line before an entry-point
    plugin's options are known: `--llama3-checkpoint DIR` makes DIR look like a test path, and the rootdir DIR. No
    public hook runs between the two, so pick it again without our options' values, through pytest's own
    `determine_setup` and the private Config attributes it sets (checked with pytest 8.0.2, 8.4.2 and 9.2.0;
    tests/test_suite.py runs the case)."""
    ns = early_config.known_args_namespace
    ours = [getattr(ns, f"llama3_{name}", None) for name in OPTIONS]
    if not any(isinstance(v, str) and Path(v).exists() for v in ours) or ns.rootdir or ns.inifilename:
        return
    rootpath, inipath, inicfg = _determine_setup(early_config, ns.file_or_dir, ns.override_ini)
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
        if early_config.known_args_namespace.override_ini != ns.override_ini:  # `-o` in addopts (pytest 9.2 applies)
            early_config._inicfg = _determine_setup(
                early_config, ns.file_or_dir, early_config.known_args_namespace.override_ini
            )[2]
            early_config._inicache.clear()


def _determine_setup(early_config, file_or_dir, override_ini):
    """(rootpath, inipath, inicfg) as pytest determines them from these arguments; its signature across versions."""
    from _pytest.config.findpaths import determine_setup

    kwargs = dict(
        inifile=None,
        override_ini=override_ini,
        args=file_or_dir,
        rootdir_cmd_arg=None,
        invocation_dir=early_config.invocation_params.dir,
    )
    accepted = inspect.signature(determine_setup).parameters
    rootpath, inipath, inicfg, *_ = determine_setup(**{k: v for k, v in kwargs.items() if k in accepted})
    return rootpath, inipath, inicfg


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if not suite_requested(config):
        return  # not asked for: nothing imported, nothing printed (this repository's tests of `case` load it lazily)
    config.stash[STATE] = load_suite(config, check=not hasattr(config, "workerinput"))  # once, by the controller
    if SUITE not in {Path(a.split("::")[0]).resolve() for a in config.args}:
        config.args.append(str(SUITE))


def load_suite(config, *, check: bool) -> SuiteState:
    """The options read, the cases made and (`check`) every input a run would refuse refused now, as one line. The
    checks make the tiny checkpoints where the runs find them: beside the kept traces, else in a temporary folder."""
    from .errors import HarnessError
    from .suite_cases import check_inputs, read_options, suite_cases

    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # an xdist worker: one torch thread each, so N workers use N cores, not N^2
        import torch

        torch.set_num_threads(1)
    run_id = workerinput["testrunuid"] if workerinput else uuid.uuid4().hex
    tiny_root = Path(workerinput["llama3_tiny"]) if workerinput and "llama3_tiny" in workerinput else None
    temporary = None
    try:
        options = read_options(lambda name: option(config, name))
        cases = suite_cases(options)
        if check:
            made = options.golden is not None or any(c.tiny for c in cases)  # else no checkpoint to make
            temporary = Path(tempfile.mkdtemp(prefix="llama3-tiny-")) if made and not options.trace_dir else None
            tiny_root = temporary or (Path(options.trace_dir) / "tiny" if made else None)
            check_inputs(options, cases, tiny_root)
    except HarnessError as e:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        raise pytest.UsageError(str(e)) from None
    return SuiteState(options, cases, run_id, tiny_root, made_here=temporary is not None)


def suite_state(config) -> SuiteState:
    """The suite's state; for this repository's own tests of `verified(case)` without any option, the defaults."""
    if STATE not in config.stash:
        config.stash[STATE] = load_suite(config, check=False)
    return config.stash[STATE]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist: tell each worker where the controller made the tiny checkpoints."""
    state = node.config.stash.get(STATE, None)
    if state is not None and state.tiny_root is not None:
        node.workerinput["llama3_tiny"] = str(state.tiny_root)


def pytest_unconfigure(config):
    state = config.stash.get(STATE, None)
    if state is not None and state.made_here:
        shutil.rmtree(state.tiny_root, ignore_errors=True)


def pytest_report_header(config):
    state = config.stash.get(STATE, None)
    if state is None or not suite_requested(config):
        return None
    against = f"golden set {state.options.golden.path}" if state.options.golden else "Hugging Face"
    return [
        f"llama3 harness: {state.options.impl} against {against}, {len(state.cases)} case(s): "
        + ", ".join(f"{c.id} ({c.n_layers} layers x {c.n_heads} heads)" for c in state.cases)
    ]


def pytest_terminal_summary(terminalreporter, config):
    """Each case's blind spots: the RoPE-scaling bugs its dtype and prompt length cannot tell from rounding
    (harness/blind_spots.py, the line `verify` prints); nothing when every one is seen."""
    state = config.stash.get(STATE, None)
    if state is None or not suite_requested(config) or state.options.golden:
        return
    from .blind_spots import blind_spots
    from .run import make_run
    from .suite_cases import checkpoint_of

    reports = [r for kept in terminalreporter.stats.values() for r in kept if getattr(r, "when", None) == "call"]
    ran = [r.nodeid for r in reports if Path(str(r.location[0])).name == SUITE.name]  # none under -m "not slow"
    for case in [c for c in state.cases if c.checkpoint or state.tiny_root is not None]:
        if not any(case.id in n for n in ran) and not (ran and len(state.cases) == 1):
            continue  # a case none of whose tests ran says nothing
        options = state.options
        run = make_run(
            checkpoint_of(case, state.tiny_root), prompt=options.prompt, dtype=case.dtype, prompts=options.prompts
        )
        n_tokens = run.batch.width if run.batch else len(run.tokens)  # a batch: its longest sequence sees the most
        spots = blind_spots(run.checkpoint.config, case.dtype, n_tokens, case.layer_indices[0])
        line = spots.line(dtype_flag="--llama3-dtype")
        if line:
            terminalreporter.write_line(f"llama3 harness, {case.id}: {line}")


def _prefix(cases: list[Case], case: Case) -> str:
    return f"{case.id}-" if len(cases) > 1 else ""


def _steps(case: Case) -> list[int | None]:
    """A generation's steps (0: the prefill), or [None] for one forward pass."""
    return list(range(case.generate + 1)) if case.generate else [None]


def _step_id(step: int | None) -> str:
    return "" if step is None else f"step{step}-"


def pytest_generate_tests(metafunc):
    if not {"head_case", "layer_case", "case"} & set(metafunc.fixturenames):
        return
    from .names import head_parts, layer_parts

    cases = suite_state(metafunc.config).cases
    if "head_case" in metafunc.fixturenames:
        params = [
            (c, layer, head, part, step)
            for c in cases
            for step in _steps(c)
            for layer in c.layer_indices
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
            (c, layer, part, step) for c in cases for step in _steps(c) for layer in c.layer_indices for part in parts
        ]
        ids = [f"{_prefix(cases, c)}{_step_id(step)}layer{layer}-{part}" for c, layer, part, step in params]
        metafunc.parametrize("layer_case", params, ids=ids)
    if "case" in metafunc.fixturenames:
        params = [pytest.param(c, marks=_outside(c, metafunc.function.__name__)) for c in cases]
        metafunc.parametrize("case", params, ids=[c.id for c in cases])


# What a whole-model test of harness/suite.py checks: the embeddings (before layer 0), or after the last layer.
_BEFORE_THE_LAYERS = {"test_embeddings"}
_AFTER_THE_LAYERS = {"test_final_norm", "test_logits", "test_next_token"}


def _outside(case: Case, test: str) -> list:
    """A skip mark for a whole-model test whose names a `--llama3-layers` range leaves out."""
    if case.layers is None:
        return []
    start, stop = case.layers
    if test in _BEFORE_THE_LAYERS and start > 0 or test in _AFTER_THE_LAYERS and stop < case.n_layers:
        return [pytest.mark.skip(reason=f"outside --llama3-layers {start}:{stop} of {case.n_layers} layers")]
    return []


# ---- computed once per session, by whichever worker gets there first -------------------------------------------------


@pytest.fixture(scope="session")
def shared_dir(request, tmp_path_factory) -> Path:
    """A folder every xdist worker of this session sees: the session's base temp, not a worker's own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if hasattr(request.config, "workerinput") else base


@pytest.fixture(scope="session")
def verified(request, shared_dir):
    """`verified(case)`: trace reference + implementation, compare, once per session for all workers (under a file
    lock); or, with a golden set, check the implementation against it."""
    from .suite_cases import verified_once

    state = suite_state(request.config)
    root = Path(state.options.trace_dir) if state.options.trace_dir else shared_dir / "llama3-traces"
    root.mkdir(parents=True, exist_ok=True)
    tiny_root = state.tiny_root or shared_dir / "tiny"
    cache = {}

    def get(case: Case):
        if case.id not in cache:
            cache[case.id] = verified_once(case, state.options, root=root, session=state.run_id, tiny_root=tiny_root)
        return cache[case.id]

    return get


def pytest_collection_modifyitems(config, items):
    """Keep each shared computation's tests on one xdist worker (`--dist loadgroup`), so that workers compute
    different cases side by side instead of waiting on each other's file lock. A test module may name its own group
    (`XDIST_GROUP`, a string or a function of the item)."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        group = None
        for key in ("head_case", "layer_case", "case"):
            if key in params:
                value = params[key]
                group = (value[0] if isinstance(value, tuple) else value).id
        if group is None:
            group = getattr(getattr(item, "module", None), "XDIST_GROUP", None)
            if callable(group):
                group = group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
