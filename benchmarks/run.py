"""Benchmarks: wall time and peak RSS of verify at three sizes, the cost of the tap points, the reference's forward.

    python benchmarks/run.py [--work DIR] [--full] [--json OUT] [--only verify|forward|generate]

`generate`: `verify --generate 32` on the 8b-wide shape in bfloat16 (a prefill and 32 decode steps on both sides, the
float64 oracle per step, the implementation's no-cache forward over the 32 + P tokens).

Each measurement runs in a fresh subprocess (peak RSS from wait4); short ones are repeated and the median kept.
`--full` adds the 32-layer 8B-shape verify (a 16 GB checkpoint on disk). Not a test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB, stdout) of one subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out}")
    return wall, usage.ru_maxrss / 2**20, out


def harness(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *args]


def ensure(path: Path, *make_args: str) -> Path:
    if not path.exists():
        run(harness("make-tiny", str(path), *make_args))
    return path


# The forward with tracing off, on, and with no tap points at all (record(...) statements removed from the source).
FORWARD_TIMER = r"""
import ast, statistics, sys, tempfile, time, torch
from pathlib import Path
import harness.scratch as scratch
from harness.checkpoint import open_checkpoint
from harness.run import DEFAULT_PROMPT, prompt_tokens
from harness import tracing

class DropRecord(ast.NodeTransformer):
    def visit_Expr(self, node):
        call = node.value
        return None if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "record" else node
    def visit_For(self, node):
        self.generic_visit(node)
        return node if node.body else None
    def visit_If(self, node):  # `if is_tracing(): <records>` goes with its records
        self.generic_visit(node)
        return node if node.body else None

tree = ast.fix_missing_locations(DropRecord().visit(ast.parse(Path(scratch.__file__).read_text())))
no_taps = type(scratch)("harness.scratch_no_taps")
no_taps.__package__ = "harness"
exec(compile(tree, "scratch_no_taps", "exec"), no_taps.__dict__)
assert "record(" not in ast.unparse(tree)

ckpt = open_checkpoint(sys.argv[1]); dtype = getattr(torch, sys.argv[2]); repeat = int(sys.argv[3])
tokens = prompt_tokens(ckpt, DEFAULT_PROMPT)
tmp = Path(tempfile.mkdtemp())
def off(): scratch.forward(ckpt, tokens, dtype=dtype)
def none(): no_taps.forward(ckpt, tokens, dtype=dtype)
def on():
    with tracing(tmp / "t.h5"): scratch.forward(ckpt, tokens, dtype=dtype)
times = {"no_taps": [], "tracing_off": [], "tracing_on": []}
with torch.inference_mode():
    off(); none()  # warm up
    order = [("no_taps", none), ("tracing_off", off), ("tracing_on", on)]
    for r in range(repeat):  # interleaved and rotated, so load drift and cache effects hit all three alike
        for key, fn in order[r % 3:] + order[:r % 3]:
            t = time.perf_counter(); fn(); times[key].append(time.perf_counter() - t)
print({k: min(v) for k, v in times.items()})  # the least disturbed run of each
"""

# The reference's own forward, tracing off: Hugging Face's model built on the meta device (only the norms loaded) and
# run with each projection reading its weight as it runs (best of `repeat`), then its float64 oracle once.
REFERENCE_TIMER = r"""
import sys, time, torch
from harness.checkpoint import open_checkpoint
from harness.reference import forward, run_oracle
from harness.run import DEFAULT_PROMPT, prompt_tokens

ckpt = open_checkpoint(sys.argv[1]); repeat = int(sys.argv[2])
tokens = torch.tensor(prompt_tokens(ckpt, DEFAULT_PROMPT))  # [T]
times = []
with torch.inference_mode():
    for _ in range(repeat):
        t = time.perf_counter(); forward(ckpt, tokens, dtype=torch.bfloat16, device="cpu", oracle=False)
        times.append(time.perf_counter() - t)
    t = time.perf_counter(); run_oracle(ckpt, tokens, prefix="", device="cpu", return_logits=True)
    oracle = time.perf_counter() - t
print({"reference_s": min(times), "oracle_s": oracle})
"""


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = int(
        next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    )
    return f"{os.cpu_count()} cores, {mem / 2**20:.0f} GiB RAM, {cpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/llama3-bench", help="where checkpoints and outputs go")
    parser.add_argument("--full", action="store_true", help="also the 32-layer 8B shape (16 GB on disk)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--only", choices=["verify", "forward", "generate"], help="run one part only")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def add(what: str, wall: float, rss: float | None = None, note: str = "") -> None:
        rows.append(
            dict(what=what, wall_s=round(wall, 5), peak_rss_gb=None if rss is None else round(rss, 2), note=note)
        )
        shown = f"{wall:8.2f} s " if wall >= 1 else f"{wall * 1000:8.2f} ms"
        print(f"{what:55} {shown}  {'' if rss is None else f'{rss:6.2f} GB'}  {note}", flush=True)

    tiny = ensure(work / "tiny")
    wide = ensure(work / "8b-wide", "--shape", "8b-wide")
    if args.only in (None, "verify"):
        measure_verify(args, work, tiny, wide, add)
    if args.only not in ("verify", "generate"):
        measure_forward(args, tiny, wide, add)
    if args.only in (None, "generate"):
        measure_generate(work, wide, add)
    header = f"{datetime.date.today()}, {machine()}, torch {__import__('torch').__version__}"
    print(header)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=header, rows=rows), indent=1))


def measure_verify(args, work: Path, tiny: Path, wide: Path, add) -> None:
    walls = [run(harness("verify", str(tiny), "--out", str(work / "v-tiny"))) for _ in range(3)]
    add(
        "verify tiny (float32, imports included)",
        statistics.median(w for w, _, _ in walls),
        max(r for _, r, _ in walls),
    )
    walls = [run(harness("verify", str(tiny), "--dtype", "bfloat16", "--out", str(work / "v-tiny"))) for _ in range(3)]
    add(
        "verify tiny (bfloat16, imports included)",
        statistics.median(w for w, _, _ in walls),
        max(r for _, r, _ in walls),
    )

    size = (wide / "consolidated.00.pth").stat().st_size / 2**30
    wall, rss, _ = run(harness("verify", str(wide), "--dtype", "bfloat16", "--out", str(work / "v-wide")))
    add(
        "verify 8b-wide (bfloat16)",
        wall,
        rss,
        f"checkpoint {size:.2f} GiB; target 1.3x + 1.5 = {1.3 * size + 1.5:.2f} GiB",
    )

    if args.full:
        full = ensure(work / "8b", "--shape", "8b")
        size = (full / "consolidated.00.pth").stat().st_size / 2**30
        wall, rss, _ = run(harness("verify", str(full), "--dtype", "bfloat16", "--out", str(work / "v-8b")))
        add("verify 8b, 32 layers (bfloat16)", wall, rss, f"checkpoint {size:.2f} GiB")


def measure_generate(work: Path, wide: Path, add, steps: int = 32) -> None:
    size = (wide / "consolidated.00.pth").stat().st_size / 2**30
    wall, rss, out = run(
        harness("verify", str(wide), "--dtype", "bfloat16", "--generate", str(steps), "--out", str(work / "v-gen"))
    )
    verdict = next((line for line in out.splitlines() if line.startswith(("PASS", "FAIL"))), "")[:60]
    add(f"verify 8b-wide --generate {steps} (bfloat16)", wall, rss, f"checkpoint {size:.2f} GiB; {verdict}")


def measure_forward(args, tiny: Path, wide: Path, add) -> None:
    for label, ckpt, dtype, repeat in (
        ("tiny", tiny, "float32", 20 * args.repeat),
        ("8b-wide", wide, "bfloat16", args.repeat),
    ):
        _, _, out = run([sys.executable, "-c", FORWARD_TIMER, str(ckpt), dtype, str(repeat)])
        t = eval(out.strip().splitlines()[-1])
        for key in ("no_taps", "tracing_off", "tracing_on"):
            add(
                f"scratch forward {label} ({dtype}), {key.replace('_', ' ')}",
                t[key],
                None,
                f"{100 * (t[key] / t['no_taps'] - 1):+.1f}% vs no taps (best of {repeat})",
            )
    _, rss, out = run([sys.executable, "-c", REFERENCE_TIMER, str(wide), str(args.repeat)])
    t = eval(out.strip().splitlines()[-1])
    add("reference forward 8b-wide (bfloat16), tracing off", t["reference_s"], rss, f"best of {args.repeat}")
    add("its float64 oracle 8b-wide, tracing off", t["oracle_s"], None, "once")


if __name__ == "__main__":
    main()
