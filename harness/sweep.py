"""`sweep`: a grid of verify jobs (checkpoint x implementation x dtype x prompt x layer range x generate) run as Ray
tasks, each asking Ray for the memory its config and prompt length need; one table, sweep.json and sweep.html of them.

The engine (Ray, retries, results written as they come, a rerun skipping what is done): harness/sweep_ray.py. The
table, the page and the merge of layer ranges into one whole-model comparison: harness/sweep_report.py.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import HarnessError
from .run import DEFAULT_PROMPT, DTYPES, read_prompt_file
from .sweep_ray import Task, node_memory, ray_session, run_tasks
from .sweep_report import merge_comparisons, read_comparison, write_merged, write_sweep

AXES = ("checkpoint", "impl", "dtype", "prompt", "prompt_file", "layers", "generate")  # a spec's keys, the CLI's flags
GIB = 2**30
# The interpreter with torch and transformers imported: `verify` tiny peaks at 0.41-0.47 GiB (docs/performance.md).
BASE_MEMORY = GIB // 2
# Per token, what no other term holds (the traces' rows, their float64 copies): fitted so that tiny 3.1 at 2048 tokens
# (1.38 GiB measured, docs/performance.md) is covered; the other measured peaks are covered with it (docs/sweep.md).
TOKEN_MEMORY = 384 * 1024
# The margin on the weights a verify holds at once: with the streamed reference, 17-token verifies from the 8B's to the
# 405B's width peak 1-5% below the estimate without it (2026-11-30, docs/sweep.md); 25% more on the weights covers
# the allocator's slack and an implementation that holds a little more than the from-scratch forward.
WEIGHTS_MARGIN = 1.25
STORED_SIZE = 2  # bytes a weight takes in the checkpoint: bfloat16, as Llama 3 ships


@dataclass(frozen=True)
class Job:
    """One verify: a point of the grid. Paths are absolute, so a worker anywhere reads the same files."""

    checkpoint: str
    impl: str = "scratch"
    dtype: str = "float32"
    prompt: str = DEFAULT_PROMPT  # the text itself (a prompt file's, read once by the driver)
    prompt_name: str = "default"  # what the table shows: `default`, the text cut short, or the file's name
    layers: tuple[int, int] | str | None = None  # layers [A, B) only; `auto`: ranges that fit the nodes; None: all
    generate: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        layers = data.get("layers")
        return cls(**{**data, "layers": tuple(layers) if isinstance(layers, list) else layers})

    @property
    def name(self) -> str:
        impl = re.sub(r"^.*/", "", self.impl)  # path/to/my_llama.py:forward -> my_llama.py:forward
        layers = self.layers if not isinstance(self.layers, tuple) else f"{self.layers[0]}:{self.layers[1]}"
        layers = f" layers {layers}" if layers else ""
        generate = f" +{self.generate}" if self.generate else ""
        return f"{Path(self.checkpoint).name} {impl} {self.dtype} {self.prompt_name}{layers}{generate}"

    @property
    def id(self) -> str:
        """The name made a file name, and 8 hex digits of every field: a rerun finds its results, a changed job not."""
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        return re.sub(r"[^\w.+-]+", "_", self.name).strip("_")[:80] + "-" + digest


# ---- the grid: from the command line or a spec file ------------------------------------------------------------------


def grid_jobs(values: dict[str, Any], where: Callable[[str], str], base: Path) -> list[Job]:
    """Every combination of the axes' values (a value, a comma list, or a list; absent: the default). Relative paths
    are taken from `base`. `where(key)` names the flag or the spec's key in error messages."""
    if unknown := sorted(set(values) - set(AXES)):
        raise HarnessError(f"{where(unknown[0])}: unknown key; a spec's keys are {', '.join(AXES)} and [[grid]]")
    checkpoints = [os.path.abspath(base / Path(c).expanduser()) for c in _texts(values, "checkpoint", where, ",")]
    if not checkpoints:
        raise HarnessError(f"{where('checkpoint')}: no checkpoint given")
    impls = [_impl_path(i, base) for i in _texts(values, "impl", where, ",")] or ["scratch"]
    dtypes = _texts(values, "dtype", where, ",") or ["float32"]
    if bad := [d for d in dtypes if d not in DTYPES]:
        raise HarnessError(f"{where('dtype')}: unknown dtype {bad[0]!r}; choose from {', '.join(DTYPES)}")
    prompts = [(p, _prompt_name(p)) for p in _texts(values, "prompt", where)]
    prompts += [(read_prompt_file(base / f), Path(f).name) for f in _texts(values, "prompt_file", where)]
    layers = [_layer_range(x, where) for x in _texts(values, "layers", where, ",")] or [None]
    generates = [_count(g, where) for g in _texts(values, "generate", where, ",")] or [0]
    jobs = [
        Job(c, i, d, p, name, lr, g)
        for c in checkpoints
        for i in impls
        for d in dtypes
        for p, name in prompts or [(DEFAULT_PROMPT, "default")]
        for lr in layers
        for g in generates
    ]
    return list(dict.fromkeys(jobs))  # a job given twice runs once


def read_spec(path: str | Path) -> list[Job]:
    """A .toml or .json spec: the axes as top-level keys (defaults for every grid), and optionally `[[grid]]` tables
    of them, each one grid; the jobs of every grid. Paths in it are relative to the spec's folder."""
    path = Path(path)
    data = _load_spec(path)
    grids = data.pop("grid", [{}])
    if not isinstance(grids, list) or not all(isinstance(g, dict) for g in grids):
        raise HarnessError(f"{path}: grid: expected [[grid]] tables (a list of objects)")
    where = lambda key: f"{path}: {key}"  # noqa: E731
    jobs = [job for grid in grids for job in grid_jobs({**data, **grid}, where, path.parent)]
    return list(dict.fromkeys(jobs))


def _load_spec(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise HarnessError(f"{path}: spec file not found")
    if path.suffix not in (".toml", ".json"):
        raise HarnessError(f"{path}: a spec is a .toml or a .json file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            from .dump_map import toml_module

            data = toml_module().loads(text)
    except ImportError:
        raise HarnessError(f"{path}: reading TOML needs Python 3.11 (tomllib); write the spec as .json") from None
    except ValueError as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError are both ValueErrors
        raise HarnessError(f"{path}: not valid {path.suffix[1:].upper()}: {e}") from None
    if not isinstance(data, dict):
        raise HarnessError(f"{path}: expected an object of {', '.join(AXES)} at the top")
    return data


def _texts(values: dict[str, Any], key: str, where: Callable[[str], str], sep: str | None = None) -> list[str]:
    """A key's values as texts: one value or a list; with `sep`, each also split on it (`--dtype float32,bfloat16`)."""
    value = values.get(key)
    items = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in items):
        raise HarnessError(f"{where(key)}: expected text or a list of texts, got {value!r}")
    items = [str(v) for v in items]
    return [part.strip() for v in items for part in v.split(sep) if part.strip()] if sep else items


def _impl_path(impl: str, base: Path) -> str:
    """`path/to/file.py:ATTR` with the path made absolute (a worker's folder is not ours); other specs as they are."""
    where, _, attr = impl.rpartition(":")
    return f"{os.path.abspath(base / where)}:{attr}" if where.endswith(".py") else impl


def _prompt_name(prompt: str) -> str:
    if prompt == DEFAULT_PROMPT:
        return "default"
    return repr(prompt if len(prompt) <= 24 else prompt[:21] + "...")


def _layer_range(text: str, where: Callable[[str], str]) -> tuple[int, int] | str:
    if text == "auto":
        return text
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match or int(match[1]) >= int(match[2]):
        raise HarnessError(f"{where('layers')}: expected auto or ranges A:B with A < B (0:16,16:32), got {text!r}")
    return int(match[1]), int(match[2])


def _count(text: str, where: Callable[[str], str]) -> int:
    if not text.isdigit():
        raise HarnessError(f"{where('generate')}: expected a whole number, 0 or more, got {text!r}")
    return int(text)


def layer_ranges_supported() -> bool:
    """Whether this harness's `verify` takes `layers=(A, B)` (the layer-range verify)."""
    from .verify import verify

    return "layers" in inspect.signature(verify).parameters


def check_layers(jobs: Iterable[Job]) -> None:
    if any(job.layers is not None for job in jobs) and not layer_ranges_supported():
        raise HarnessError("--layers needs the layer-range verify (verify(..., layers=(A, B))), not in this harness")


# ---- memory: what a job asks of Ray ----------------------------------------------------------------------------------


def estimate_memory(config: ModelConfig, n_tokens: int, dtype: str, layers: tuple[int, int] | None = None) -> int:
    """Bytes a verify job peaks at, from the config and the prompt's length (prompt + generated tokens); above every
    peak measured in docs/performance.md (docs/sweep.md has the table). Every side reads its weights as it runs, so
    neither the depth nor a range (`layers`) changes it. The terms: the most weights held at once, times
    WEIGHTS_MARGIN: the from-scratch forward's one decoder layer in the working dtype (and, cast from bfloat16, its
    largest tensor as read), or the float64 oracle's block (a projection, at most BLOCK_BYTES, or LOGIT_ROWS rows of
    the output) with its bfloat16 source; one layer's attention scores and probabilities in float32 (three
    [H, T, T]); the logits of both sides and of the oracle ([T, V] in the dtype and in float64); TOKEN_MEMORY each
    token."""
    from .weights import BLOCK_BYTES, LOGIT_ROWS  # the oracle's blocks (here: weights.py imports transformers)

    c, size = config, DTYPES[dtype].itemsize
    attention = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)  # wq, wo; wk, wv
    layer = attention + 3 * c.dim * c.ffn_dim + 2 * c.dim  # w1, w2, w3; two norms
    largest = c.dim * max(c.ffn_dim, c.n_heads * c.head_dim)  # w1 (or wq)
    scratch = layer * size + (largest * STORED_SIZE if size != STORED_SIZE else 0)
    oracle = max(min(largest * 8, BLOCK_BYTES), min(LOGIT_ROWS, c.vocab_size) * c.dim * 8) * (8 + STORED_SIZE) // 8
    weights = WEIGHTS_MARGIN * max(scratch, oracle)
    scores = 3 * c.n_heads * n_tokens * n_tokens * 4
    logits = n_tokens * c.vocab_size * (size + 8)
    return int(BASE_MEMORY + weights + scores + logits + n_tokens * TOKEN_MEMORY)


def auto_ranges(config: ModelConfig, n_tokens: int, dtype: str, memory: int) -> list[tuple[int, int]]:
    """`--layers auto`: consecutive ranges of as many layers as fit in `memory` bytes (at least one each)."""
    n = config.n_layers
    fits = [k for k in range(1, n + 1) if estimate_memory(config, n_tokens, dtype, (0, k)) <= memory]
    per = max(fits, default=1)
    return [(a, min(a + per, n)) for a in range(0, n, per)]


def job_facts(jobs: Iterable[Job]) -> dict[tuple[str, str], tuple[ModelConfig, int]]:
    """(checkpoint, prompt) -> (the config, the prompt's token count), each checkpoint opened and checked once: a bad
    checkpoint or a prompt too long for it is one line before Ray starts."""
    from .checkpoint import open_checkpoint
    from .run import prompt_tokens

    opened, facts = {}, {}
    for job in jobs:
        if (job.checkpoint, job.prompt) not in facts:
            ckpt = opened.setdefault(job.checkpoint, open_checkpoint(job.checkpoint))
            facts[job.checkpoint, job.prompt] = (ckpt.config, len(prompt_tokens(ckpt, job.prompt)))
    return facts


def plan(jobs: list[Job], facts: dict, out: Path, ray, notes: list[str]) -> list[Task]:
    """Each job a Ray task asking for its memory; `auto` layers split into ranges that fit the smallest node; a job
    that needs more than any node offers asks for the largest node whole (so it runs alone there), with a note."""
    largest, smallest = node_memory(ray), node_memory(ray, smallest=True)
    tasks = []
    for job in jobs:
        config, n_tokens = facts[job.checkpoint, job.prompt]
        n_tokens += job.generate
        if job.layers == "auto":
            ranges = auto_ranges(config, n_tokens, job.dtype, smallest)
            parts = [replace(job, layers=r) for r in ranges] if len(ranges) > 1 else [replace(job, layers=None)]
        else:
            parts = [job]
        for part in parts:
            memory = estimate_memory(config, n_tokens, part.dtype, part.layers)
            if memory > largest:
                notes.append(
                    f"{part.name}: needs about {memory / GIB:.1f} GiB, more than any node offers Ray "
                    f"({largest / GIB:.1f} GiB): given a whole node"
                )
                memory = largest
            tasks.append(Task(part.id, part.name, memory, {"job": asdict(part), "out": str(out)}))
    return list({t.id: t for t in tasks}.values())


# ---- in the worker: one verify ---------------------------------------------------------------------------------------


def run_job(job: dict[str, Any], out: str) -> dict[str, Any]:
    """One verify into `out/jobs/ID/` (traces, comparison.json, report.html); returns its summary."""
    from .verify import verify

    job = Job.from_json(job)
    folder = Path(out) / "jobs" / job.id
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_staged(Path(out), job.id)
    layers = {"layers": job.layers} if job.layers is not None else {}
    result = verify(
        job.checkpoint,
        out=folder,
        dtype=job.dtype,
        prompt=job.prompt,
        impl=job.impl,
        generate=job.generate,
        **layers,
    )
    c = result.comparison
    worst = max(c.results, key=lambda r: r.ratio if r.ratio == r.ratio else float("inf"), default=None)
    cache = next((f"cache: {r.name}" for r in result.cache_check if not r.passed), None)
    return {
        "passed": result.passed,
        "names": len(c.results),
        "names_passed": sum(r.passed for r in c.results),
        "worst_ratio": None if worst is None else _finite(worst.ratio),
        "worst_name": None if worst is None else worst.name,
        "first_divergence": c.first_divergence or cache,
        "next_token": {"reference": result.reference_text, "implementation": result.implementation_text},
        "folder": f"jobs/{job.id}",
    }


def remove_staged(out: Path, job_id: str) -> None:
    """What a killed try of this job left staged beside its verify folder (verify stages traces there)."""
    for staged in (out / "jobs").glob(f".{job_id}.*"):
        shutil.rmtree(staged, ignore_errors=True)


def _finite(x: float) -> float | str:
    return x if x == x and abs(x) != float("inf") else str(x)  # JSON has no inf or nan


def merge_layer_ranges(out: Path, records: list[dict], facts: dict) -> list[dict[str, Any]]:
    """For each job whose done layer ranges tile its model (0:A, A:B, ..., :n_layers), the merged comparison written
    to `out/merged/ID/` (comparison.json, report.html) and summarised."""
    groups: dict[Job, list[tuple[tuple[int, int], dict]]] = defaultdict(list)
    for record in records:
        job = Job.from_json(record["kwargs"]["job"])
        if isinstance(job.layers, tuple) and record["status"] == "done":
            groups[replace(job, layers=None)].append((job.layers, record))
    merged = []
    for whole, parts in groups.items():
        parts.sort(key=lambda p: p[0])
        ranges = [p[0] for p in parts]
        n_layers = facts[whole.checkpoint, whole.prompt][0].n_layers
        if [a for a, _ in ranges] != [0, *(b for _, b in ranges[:-1])] or ranges[-1][1] != n_layers:
            continue  # the ranges do not cover the model once, in order
        data = merge_comparisons([read_comparison(out / r["result"]["folder"] / "comparison.json") for _, r in parts])
        merged.append(write_merged(out / "merged" / whole.id, whole.name, data, ranges))
    return merged


# ---- the sweep -------------------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    out: Path
    records: list[dict[str, Any]]
    merged: list[dict[str, Any]]
    notes: list[str]
    seconds: float

    @property
    def exit_code(self) -> int:
        """2: a job's input was bad (HarnessError); 1: a job diverged, raised or died; 0: every job passed."""
        if any(r["status"] == "error" for r in self.records):
            return 2
        passed = all(r["status"] == "done" and r["result"]["passed"] for r in self.records)
        return 0 if passed and all(m["passed"] for m in self.merged) else 1


def sweep(
    jobs: list[Job],
    out: str | Path,
    *,
    address: str | None = None,
    on_record: Callable[[dict[str, Any], int, int], None] = lambda record, done, total: None,
) -> SweepResult:
    """Run `jobs` on Ray (`address`, $RAY_ADDRESS, or a local instance) into `out`: `results/ID.json` per job as it
    finishes, `jobs/ID/` its verify folder, sweep.json and sweep.html rewritten at each. Jobs done in an earlier run
    into `out` are not run again. `on_record(record, finished, total)` after each job."""
    start = time.perf_counter()
    out = Path(out).absolute()
    check_layers(jobs)
    facts = job_facts(jobs)  # every checkpoint and prompt checked before Ray starts
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    finished: list[dict[str, Any]] = []
    with ray_session(address) as ray:
        tasks = plan(jobs, facts, out, ray, notes)

        def arrived(record: dict[str, Any]) -> None:  # skipped (done before) first, then each job as it finishes
            finished.append(record)
            if record["status"] != "done":
                remove_staged(out, record["id"])
            write_sweep(out, finished, [], notes, time.perf_counter() - start)
            on_record(record, len(finished), len(tasks))

        records = run_tasks(tasks, run_job, out / "results", on_record=arrived)
    merged = merge_layer_ranges(out, records, facts)
    result = SweepResult(out, records, merged, notes, time.perf_counter() - start)
    write_sweep(out, records, merged, notes, result.seconds)
    return result
