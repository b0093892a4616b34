"""harness/sweep.py, sweep_ray.py, sweep_report.py: `python -m harness sweep`, a grid of verify jobs as Ray tasks.

The grid, the spec, the memory estimate and the merge of layer ranges run without Ray. The jobs themselves run on a
local Ray with 2 CPUs, started once for this module (`local_ray`), and are skipped where Ray is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from harness.config import config_from_params_json
from harness.sweep import GIB, Job, auto_ranges, estimate_memory, grid_jobs, layer_ranges_supported, plan, read_spec
from harness.sweep_report import merge_comparisons
from harness.tiny import SHAPES, VARIANTS, make_tiny_once
from tests.helpers_bad_input import assert_refused
from tests.helpers_bad_input import cli as run_main

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.xdist_group("ray")  # one local Ray for the module, on one xdist worker


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_once(tmp_path_factory.mktemp("sweep-tiny"), "3.0", 0)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs for the module: token authentication off (nothing written to ~/.ray), its session
    files in a temporary folder removed after, shut down after the module's last test."""
    ray = pytest.importorskip("ray", reason="the sweep tests need Ray: pip install 'llama3-harness[ray]'")
    temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's unix sockets live under it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
            yield ray
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


def _config(params: dict, tmp_path: Path):
    (tmp_path / "params.json").write_text(json.dumps({"vocab_size": 768, **params}))  # the tiny tokenizer's 768
    return config_from_params_json(tmp_path / "params.json")


def _impl(tmp_path: Path, name: str, body: str) -> str:
    """An implementation file in `tmp_path`: `forward` with `body` before the scratch forward; its --impl spec."""
    path = tmp_path / f"{name}.py"
    path.write_text(
        "import os, signal, time\nfrom pathlib import Path\nfrom harness import scratch\n\n\n"
        "def forward(checkpoint, tokens, *, dtype, device):\n"
        + "".join(f"    {line}\n" for line in body.splitlines())
        + "    return scratch.forward(checkpoint, tokens, dtype=dtype, device=device)\n"
    )
    return f"{path}:forward"


def _theta_bug(tmp_path: Path) -> str:
    """The README's bug, Llama 2's rope_theta in the scratch forward: its --impl spec."""
    path = tmp_path / "theta.py"
    path.write_text(
        "import dataclasses\nfrom harness import scratch\n\n\ndef forward(checkpoint, tokens, *, dtype, device):\n"
        "    config = dataclasses.replace(checkpoint.config, rope_theta=10000.0)\n"
        "    checkpoint = dataclasses.replace(checkpoint, config=config)\n"
        "    return scratch.forward(checkpoint, tokens, dtype=dtype, device=device)\n"
    )
    return f"{path}:forward"


def _records(out: Path) -> dict[str, dict]:
    return {r["name"].split()[1]: r for r in json.loads((out / "sweep.json").read_text())["jobs"]}


# ---- the grid and the spec (no Ray) ----------------------------------------------------------------------------------


def test_the_grid_is_every_combination_with_stable_distinct_ids(tmp_path):
    (tmp_path / "p.txt").write_text("a b")
    values = dict(checkpoint=["ck"], impl="scratch,reference", dtype="float32,bfloat16", prompt_file=["p.txt"])
    jobs = grid_jobs({**values, "prompt": ["x", "y"], "generate": "0,2"}, str, tmp_path)
    assert len(jobs) == 2 * 2 * 3 * 2, [j.name for j in jobs]
    assert {j.checkpoint for j in jobs} == {str(tmp_path / "ck")}
    assert {j.prompt_name for j in jobs} == {"'x'", "'y'", "p.txt"} and {j.generate for j in jobs} == {0, 2}
    ids = [j.id for j in jobs]
    assert len(set(ids)) == len(ids) and ids == [
        j.id for j in grid_jobs({**values, "prompt": ["x", "y"], "generate": "0,2"}, str, tmp_path)
    ]
    default = grid_jobs({"checkpoint": "ck"}, str, tmp_path)
    assert [(j.impl, j.dtype, j.prompt_name, j.layers, j.generate) for j in default] == [
        ("scratch", "float32", "default", None, 0)
    ]
    assert (
        grid_jobs({"checkpoint": "ck", "impl": "my.py:forward"}, str, tmp_path)[0].impl == f"{tmp_path}/my.py:forward"
    )


def test_a_spec_gives_grids_with_shared_defaults_and_paths_from_its_folder(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(
        'checkpoint = "tiny"\ndtype = ["float32", "bfloat16"]\n\n'
        '[[grid]]\nimpl = "scratch"\ngenerate = [0, 2]\n\n'
        '[[grid]]\nimpl = "reference"\ndtype = "float16"\n'
    )
    jobs = read_spec(spec)
    assert [(j.impl, j.dtype, j.generate) for j in jobs] == [
        ("scratch", "float32", 0),
        ("scratch", "float32", 2),
        ("scratch", "bfloat16", 0),
        ("scratch", "bfloat16", 2),
        ("reference", "float16", 0),
    ]
    assert {j.checkpoint for j in jobs} == {str(tmp_path / "tiny")}
    as_json = tmp_path / "spec.json"
    as_json.write_text(json.dumps({"checkpoint": "tiny", "dtype": ["float32", "bfloat16"], "impl": "scratch"}))
    assert [j.dtype for j in read_spec(as_json)] == ["float32", "bfloat16"]


@pytest.mark.parametrize(
    "text, message",
    [
        ('checkpoint = "tiny"\ndtypes = ["float32"]\n', "spec.toml: dtypes: unknown key"),
        ('checkpoint = "tiny"\ndtype = "float8"\n', "spec.toml: dtype: unknown dtype 'float8'"),
        ('checkpoint = "tiny"\n[[grid]]\nimpl = "scratch"\nseed = 1\n', "spec.toml: seed: unknown key"),
        ('checkpoint = "tiny"\ngenerate = "two"\n', "spec.toml: generate: expected a whole number"),
        ('checkpoint = "tiny"\nlayers = "3-5"\n', "spec.toml: layers: expected auto or ranges A:B"),
        ('checkpoint = "tiny"\ndtype = [1.5]\n', "spec.toml: dtype: expected text or a list of texts"),
        ('checkpoint = "tiny\n', "spec.toml: not valid TOML"),
        ('dtype = "float32"\n', "spec.toml: checkpoint: no checkpoint given"),
    ],
    ids=[
        "unknown-key",
        "unknown-dtype",
        "unknown-key-in-grid",
        "bad-generate",
        "bad-layers",
        "not-text",
        "toml",
        "none",
    ],
)
def test_a_bad_spec_is_one_line_naming_the_file_and_key_and_exit_2(capsys, tmp_path, text, message):
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    code, out, err = run_main(capsys, "sweep", "--spec", spec, "--out", tmp_path / "out")
    assert_refused(code, err, message)
    assert not (tmp_path / "out").exists(), "nothing written for a refused spec"


def test_bad_command_line_values_are_one_line_and_exit_2(capsys, tmp_path, tiny):
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "sweep", tiny, "--dtype", "float32,float8", "--out", out)
    assert_refused(code, err, "--dtype: unknown dtype 'float8'")
    code, _, err = run_main(capsys, "sweep", tmp_path / "nowhere", "--out", out)
    assert_refused(code, err, "checkpoint directory not found")
    code, _, err = run_main(capsys, "sweep", tiny, "--out", out, "--spec", tmp_path / "s.toml")
    assert_refused(code, err, "give the grid in the spec or on the command line, not both")
    code, _, err = run_main(capsys, "sweep", "--out", out)
    assert_refused(code, err, "CKPT: no checkpoint given")


def test_an_unreachable_address_is_one_line_and_exit_2(capsys, tmp_path, tiny):
    with socket_on_a_free_port() as port:  # nothing listens there once the socket is closed
        pass
    start = time.perf_counter()
    code, _, err = run_main(capsys, "sweep", tiny, "--out", tmp_path / "out", "--address", f"127.0.0.1:{port}")
    assert_refused(code, err, f"--address 127.0.0.1:{port}: no Ray cluster answers there")
    assert time.perf_counter() - start < 10, "refused at once, not after Ray's minutes of retries"
    code, _, err = run_main(capsys, "sweep", tiny, "--out", tmp_path / "out", "--address", "nonsense")
    assert_refused(code, err, "--address nonsense: expected HOST:PORT")


class socket_on_a_free_port:
    def __enter__(self) -> int:
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        return self.socket.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.socket.close()


@pytest.mark.skipif(layer_ranges_supported(), reason="this harness's verify takes layers=: the layer-range sweep runs")
def test_layers_are_refused_without_the_layer_range_verify(capsys, tmp_path, tiny):
    code, _, err = run_main(capsys, "sweep", tiny, "--layers", "auto", "--out", tmp_path / "out")
    assert_refused(code, err, "--layers needs the layer-range verify")


# ---- memory ----------------------------------------------------------------------------------------------------------


def test_the_memory_estimate_is_above_every_measured_peak_whatever_the_depth(tmp_path):
    """Peaks measured in docs/performance.md (peak RSS of `verify`, the streamed reference): the estimate never asks
    less, nor more than twice; one layer's weights at a time, so neither depth nor a layer range changes it."""
    tiny = _config(VARIANTS["3.0"], tmp_path)
    tiny31 = _config(VARIANTS["3.1"], tmp_path)
    wide, b8 = _config(SHAPES["8b-wide"], tmp_path), _config(SHAPES["8b"], tmp_path)
    b70, b405 = _config(SHAPES["70b-wide"], tmp_path), _config(SHAPES["405b-wide"], tmp_path)
    measured = [  # (config, tokens, dtype, peak GiB)
        (tiny, 17, "float32", 0.41),
        (tiny, 17, "bfloat16", 0.47),
        (wide, 17, "bfloat16", 1.09),
        (wide, 17, "float32", 1.41),
        (b8, 17, "bfloat16", 1.07),
        (b70, 17, "bfloat16", 2.10),
        (b405, 17, "bfloat16", 6.43),
        (tiny31, 2048, "bfloat16", 1.38),
        (tiny31, 8192, "bfloat16", 5.72),
        (wide, 512, "bfloat16", 1.96),
    ]
    for config, tokens, dtype, peak in measured:
        estimate = estimate_memory(config, tokens, dtype) / GIB
        assert peak <= estimate <= 2 * peak + 0.5, (config.dim, tokens, dtype, estimate, peak)
    assert estimate_memory(b8, 17, "bfloat16", layers=(0, 8)) == estimate_memory(b8, 17, "bfloat16")
    assert estimate_memory(b8, 17, "bfloat16") == estimate_memory(wide, 17, "bfloat16"), "32 layers as 2"
    assert 14.5 * GIB // estimate_memory(b405, 17, "bfloat16") == 1, "one 405B-wide job on a 24 GB node's offer"


class FakeRay:
    """`ray.nodes()` of a cluster whose nodes offer these bytes of memory to Ray."""

    def __init__(self, *offers: float):
        self.offers = offers

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": {"CPU": 2.0, "memory": float(m)}} for m in self.offers]


def test_plan_asks_each_job_its_memory_and_gives_a_too_big_one_a_whole_node(tmp_path):
    b8 = _config(SHAPES["8b"], tmp_path)
    jobs = [Job("/ck/8b", dtype="bfloat16"), Job("/ck/8b", dtype="float32")]
    notes: list[str] = []
    tasks = plan(jobs, {("/ck/8b", jobs[0].prompt): (b8, 17)}, tmp_path, FakeRay(1 * GIB, 1.5 * GIB), notes)
    assert tasks[0].memory == estimate_memory(b8, 17, "bfloat16") < 1.5 * GIB
    assert tasks[1].memory == 1.5 * GIB, "float32 8B (about 1.7 GiB) gets the largest node's whole offer"
    assert (
        len(notes) == 1 and notes[0].startswith("8b scratch float32 default: needs about") and "whole node" in notes[0]
    )
    assert tasks[0].kwargs == {"job": dict(Job("/ck/8b", dtype="bfloat16").__dict__, layers=None), "out": str(tmp_path)}


def test_auto_layer_ranges_keep_a_model_whole_when_one_job_fits_the_smallest_node(tmp_path):
    """The estimate does not grow with depth: `auto` splits a model only where one job does not fit the smallest node
    (then into one layer a job, each given a whole node); otherwise it is one job, as without `--layers`."""
    b8 = _config(SHAPES["8b"], tmp_path)
    job = Job("/ck/8b", dtype="bfloat16", layers="auto")
    tasks = plan([job], {("/ck/8b", job.prompt): (b8, 17)}, tmp_path, FakeRay(8 * GIB, 64 * GIB), [])
    assert [t.kwargs["job"]["layers"] for t in tasks] == [None] and tasks[0].name == "8b scratch bfloat16 default"
    assert auto_ranges(b8, 17, "bfloat16", 8 * GIB) == [(0, 32)]
    ranges = auto_ranges(b8, 17, "bfloat16", GIB)
    assert ranges == [(a, a + 1) for a in range(32)]


# ---- merging layer ranges --------------------------------------------------------------------------------------------


def _result(name: str, ratio: float) -> dict:
    return {"name": name, "passed": ratio <= 1, "ratio": ratio, "nonfinite": None}


def test_layer_ranges_merge_into_one_comparison_in_forward_order_with_one_first_divergence():
    first = {"passed": True, "mode": "oracle", "results": [_result("embeddings", 0.1), _result("layers.0.output", 0.2)]}
    second = {
        "passed": False,
        "mode": "oracle",
        "only_in_a": ["x"],
        "results": [_result("logits", 3.0), _result("layers.1.attention.heads.0.q", 2.0), _result("embeddings", 0.5)],
    }
    merged = merge_comparisons([first, second])
    assert [r["name"] for r in merged["results"]] == [
        "embeddings",
        "layers.0.output",
        "layers.1.attention.heads.0.q",
        "logits",
    ]
    assert merged["first_divergence"] == "layers.1.attention.heads.0.q" and not merged["passed"]
    assert merged["results"][0]["ratio"] == 0.5, "a name two ranges judged keeps its larger ratio"
    assert merged["only_in_a"] == ["x"]
    assert merge_comparisons([first])["passed"] and merge_comparisons([first])["first_divergence"] is None


# ---- jobs on a local Ray ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_grid_runs_as_ray_tasks_into_one_table_json_and_page_and_a_rerun_skips_it(capsys, tmp_path, tiny, local_ray):
    bug = _theta_bug(tmp_path)
    out = tmp_path / "out"
    code, printed, err = run_main(
        capsys, "sweep", tiny, "--impl", f"scratch,{bug}", "--dtype", "bfloat16", "--out", out
    )
    assert code == 1, printed + err
    records = _records(out)
    assert records["scratch"]["result"]["passed"] and records["scratch"]["peak_memory"] > 0
    assert records["theta.py:forward"]["result"]["first_divergence"].endswith("q_rotated")
    table = printed[printed.index("job ") :]
    assert re.search(r"tiny-3.0-seed0 scratch bfloat16 default +PASS +0\.\d+ +none +[\d.]+ s +[\d.]+ GiB", table), table
    first = r"layers.0.attention.heads.0.q_rotated"
    assert re.search(r"theta.py:forward bfloat16 default +FAIL +[\d.]+ +" + first, table), table
    assert "[2/2] " in printed and "2 jobs (0 done in an earlier run): 1 FAIL, 1 PASS" in printed
    page = (out / "sweep.html").read_text()
    assert page.count("/report.html") == 2 and all(
        (out / r["result"]["folder"] / "report.html").is_file() for r in records.values()
    )
    results = sorted((out / "results").glob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    code, printed, _ = run_main(capsys, "sweep", tiny, "--impl", f"scratch,{bug}", "--dtype", "bfloat16", "--out", out)
    assert code == 1 and "2 jobs (2 done in an earlier run)" in printed and printed.count("skipped") == 2, printed
    assert [p.stat().st_mtime_ns for p in results] == stamps, "a rerun runs no job that is done"


@pytest.mark.slow
def test_a_job_that_raises_is_one_line_and_the_others_finish(capsys, tmp_path, tiny, local_ray):
    spec = tmp_path / "spec.toml"
    raises = _impl(tmp_path, "raises", 'raise ValueError("this implementation raises")')
    spec.write_text(
        f'checkpoint = "{tiny}"\ndtype = "bfloat16"\n'
        f'impl = ["scratch", "{raises}", "{tmp_path / "raises.py"}:no_such_function"]\n'
    )
    out = tmp_path / "out"
    code, printed, err = run_main(capsys, "sweep", "--spec", spec, "--out", out)
    assert code == 2, "a job's bad input (HarnessError) is exit 2"
    records = _records(out)
    assert records["scratch"]["status"] == "done" and records["scratch"]["result"]["passed"]
    raised = records["raises.py:forward"]  # verify's own rule: an implementation that raises is refused (exit 2)
    assert raised["status"] == "error" and "raised ValueError: this implementation raises" in raised["error"]
    assert records["raises.py:no_such_function"]["status"] == "error"
    assert "has no attribute 'no_such_function'" in records["raises.py:no_such_function"]["error"]
    lines = [line for line in printed.splitlines() if line.startswith("[")]
    assert len(lines) == 3 and any("raises.py:forward bfloat16 default: ERROR: " in x for x in lines), lines
    assert len([x for x in lines if "ValueError" in x]) == 1, "one line for the job that raised"


@pytest.mark.slow
def test_a_killed_worker_is_retried_one_that_always_dies_is_reported_and_finished_results_stay(
    capsys, tmp_path, tiny, local_ray
):
    marker = tmp_path / "pid"
    sleeper = _impl(
        tmp_path,
        "sleeper",
        f"if not Path({str(marker)!r}).exists():\n"
        f"    Path({str(marker)!r}).write_text(str(os.getpid()))\n    time.sleep(300)",
    )
    dies = _impl(tmp_path, "dies", "os.kill(os.getpid(), signal.SIGKILL)")

    def kill_the_sleeper() -> None:
        while not marker.exists() or not marker.read_text().strip():
            time.sleep(0.1)
        os.kill(int(marker.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_the_sleeper, daemon=True)
    killer.start()
    out = tmp_path / "out"
    grid = f"scratch,{sleeper},{dies}"
    code, printed, err = run_main(capsys, "sweep", tiny, "--impl", grid, "--dtype", "bfloat16", "--out", out)
    killer.join(timeout=1)
    assert code == 1, printed + err
    records = _records(out)
    assert records["scratch"]["status"] == "done" and records["sleeper.py:forward"]["status"] == "done"
    assert records["sleeper.py:forward"]["result"]["passed"], "the killed job ran again, to the end"
    assert records["sleeper.py:forward"]["pid"] != int(marker.read_text()), "in another worker"
    assert records["dies.py:forward"]["status"] == "failed"
    assert records["dies.py:forward"]["error"].startswith("its worker died on each of 2 tries")
    assert len(list((out / "results").glob("*.json"))) == 3, "every result written"
    assert not list((out / "jobs").glob(".*")), "nothing a killed try staged is left"


@pytest.mark.slow
@pytest.mark.skipif(not layer_ranges_supported(), reason="needs verify(..., layers=(A, B)), the layer-range verify")
def test_layer_ranges_run_as_jobs_and_merge_into_one_whole_model_comparison(capsys, tmp_path, tiny, local_ray):
    out = tmp_path / "out"
    impls = f"scratch,{_theta_bug(tmp_path)}"
    argv = ["sweep", tiny, "--impl", impls, "--layers", "0:1,1:3,auto", "--dtype", "bfloat16", "--out", out]
    code, printed, err = run_main(capsys, *argv)
    assert code == 1, printed + err
    data = json.loads((out / "sweep.json").read_text())
    names = [r["name"].removeprefix("tiny-3.0-seed0 ") for r in data["jobs"]]
    assert names == [
        f"{impl} bfloat16 default{layers}"
        for impl in ("scratch", "theta.py:forward")
        for layers in (" layers 0:1", " layers 1:3", "")  # auto: the tiny model fits a node whole, one job
    ]
    merged = {m["name"].split()[1]: m for m in data["merged"]}
    assert merged["scratch"]["passed"] and merged["scratch"]["first_divergence"] is None
    assert merged["scratch"]["ranges"] == [[0, 1], [1, 3]]
    comparison = json.loads((out / merged["scratch"]["folder"] / "comparison.json").read_text())
    assert {r["layer"] for r in comparison["results"] if r.get("layer") is not None} == {0, 1, 2}
    assert (out / merged["scratch"]["folder"] / "report.html").is_file()
    bug = merged["theta.py:forward"]
    assert not bug["passed"] and bug["first_divergence"] == "layers.0.attention.heads.0.q_rotated", bug
    assert re.search(r"theta.py:forward bfloat16 default \(layers 0:1, 1:3 merged\) +FAIL +[\d.]+ +layers.0", printed)


@pytest.mark.slow
def test_the_docs_quick_start_runs_from_a_fresh_folder_outside_the_repo(tmp_path):
    pytest.importorskip("ray", reason="the sweep tests need Ray: pip install 'llama3-harness[ray]'")
    text = (ROOT / "docs" / "sweep.md").read_text(encoding="utf-8")
    block = re.search(r"## Quick start\n.*?```sh\n(.*?)```", text, re.S)[1]
    commands = [line for line in block.splitlines() if line.startswith("python -m harness")]
    assert [shlex.split(c)[3] for c in commands] == ["make-tiny", "sweep"], commands
    ray_tmp = tempfile.mkdtemp(prefix="ray-")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp}
    try:
        for command in commands:
            args = shlex.split(command, comments=True)[3:]
            done = subprocess.run(
                [sys.executable, "-m", "harness", *args],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    data = json.loads((tmp_path / "sweep-out" / "sweep.json").read_text())
    assert len(data["jobs"]) == 4 and all(r["result"]["passed"] for r in data["jobs"])
    assert "4 jobs (0 done in an earlier run): 4 PASS" in done.stdout
