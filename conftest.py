"""The suite's options and its once-per-session traces, shared by every pytest-xdist worker.

`pytest -n auto` runs on the bundled tiny checkpoints; `pytest -n auto --checkpoint DIR` on a real Llama-3
(Meta or Hugging Face layout). Layers and heads are parametrized from the checkpoint's own config.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

OPTIONS = {  # option: (environment variable, default, help)
    "checkpoint": ("LLAMA3_CHECKPOINT", None, "Meta or Hugging Face Llama-3 checkpoint directory (default: the bundled tiny ones)"),
    "dtype": ("LLAMA3_DTYPE", None, "working dtype(s), comma-separated (default: float32,bfloat16 on tiny; bfloat16 with --checkpoint)"),
    "prompt": ("LLAMA3_PROMPT", None, "prompt after <|begin_of_text|> (default: the notebook's)"),
    "isolated": ("LLAMA3_ISOLATED", None, "feed each scratch layer the reference's input to it"),
    "trace_dir": ("LLAMA3_TRACE_DIR", None, "keep traces, comparison.json and report.html here for `compare` and plots"),
}


def pytest_addoption(parser):
    group = parser.getgroup("llama3", "Llama-3 verification harness")
    for name, (env, _, help_text) in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if name == "isolated":
            group.addoption(flag, action="store_true", default=None, help=f"{help_text} (env {env}=1)")
        else:
            group.addoption(flag, default=None, help=f"{help_text} (env {env})")


def option(config, name: str):
    value = config.getoption(name)
    if value is None:
        env, default, _ = OPTIONS[name]
        value = os.environ.get(env) or default
        if name == "isolated" and value is not None:
            value = value not in ("0", "", "false", "no")
    return value


@dataclass(frozen=True)
class Case:
    """One (checkpoint, dtype) the suite verifies; `tiny` is (variant, seed) for a bundled tiny checkpoint."""

    id: str
    dtype: str
    n_layers: int
    n_heads: int
    checkpoint: str | None = None
    tiny: tuple[str, int] | None = None


def suite_cases(config) -> list[Case]:
    from harness.runner import parse_dtype

    explicit = option(config, "dtype")
    checkpoint = option(config, "checkpoint")
    dtypes = (explicit or ("bfloat16" if checkpoint else "float32,bfloat16")).split(",")
    for d in dtypes:
        parse_dtype(d)
    if checkpoint:
        from harness.checkpoint import open_checkpoint

        c = open_checkpoint(checkpoint).config
        return [Case(d, d, c.n_layers, c.n_heads, checkpoint=checkpoint) for d in dtypes]
    from harness.tiny import VARIANTS

    return [Case(f"tiny{v}-{d}", d, VARIANTS[v]["n_layers"], VARIANTS[v]["n_heads"], tiny=(v, 0))
            for v in VARIANTS for d in dtypes]  # fmt: skip


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


def pytest_report_header(config):
    cases = getattr(config, "_llama3_cases", [])
    return [f"llama3 harness: {len(cases)} case(s): " + ", ".join(f"{c.id} ({c.n_layers} layers x {c.n_heads} heads)" for c in cases)]


def _prefix(cases: list[Case], case: Case) -> str:
    return f"{case.id}-" if len(cases) > 1 else ""


def pytest_generate_tests(metafunc):
    from harness.names import HEAD_NAMES, LAYER_NAMES

    cases = metafunc.config._llama3_cases
    if "head_case" in metafunc.fixturenames:
        params = [(c, layer, head, part) for c in cases for layer in range(c.n_layers)
                  for head in range(c.n_heads) for part in HEAD_NAMES]  # fmt: skip
        ids = [f"{_prefix(cases, c)}layer{layer}-head{head}-{part}" for c, layer, head, part in params]
        metafunc.parametrize("head_case", params, ids=ids)
    if "layer_case" in metafunc.fixturenames:
        parts = [p for p in LAYER_NAMES if p != "heads"]
        params = [(c, layer, part) for c in cases for layer in range(c.n_layers) for part in parts]
        ids = [f"{_prefix(cases, c)}layer{layer}-{part}" for c, layer, part in params]
        metafunc.parametrize("layer_case", params, ids=ids)
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


# ---- computed once per session, by whichever worker gets there first ---------------------------------------------------


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

    from harness.golden import tiny_dir

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
                from harness.runner import DEFAULT_PROMPT
                from harness.tracing import atomic_path
                from harness.verify import verify

                checkpoint = case.checkpoint or tiny_dir(shared_dir / "tiny", *case.tiny)
                result = verify(checkpoint, out=out, dtype=case.dtype, prompt=option(config, "prompt") or DEFAULT_PROMPT,
                                isolated=bool(option(config, "isolated")))  # fmt: skip
                summary = dict(session=session, reference_token=result.reference_token, scratch_token=result.scratch_token,
                               reference_text=result.reference_text, scratch_text=result.scratch_text,
                               checkpoint=str(checkpoint))  # fmt: skip
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
