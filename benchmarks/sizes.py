"""Benchmark: verify at real model widths (issue 19), each run's wall time and peak RSS from `/usr/bin/time -v`.

    python benchmarks/sizes.py --work /work/big [--only 70b,405b,8b,tiny] [--keep] [--json OUT]

`70b`: make-tiny --shape 70b-wide with 2 and 6 layers, a bfloat16 verify of each (peak RSS independent of depth), and
`verify --layers 2:4` of the 6-layer one (a range's cost). `405b`: --shape 405b-wide with 2 layers, a bfloat16 verify.
`8b`: --shape 8b (32 layers, 15 GB), a bfloat16 verify. `tiny`: a bfloat16 verify of the tiny 3.0. Checkpoints are
written under --work (several GB each: a 70b-wide layer is 1.7 GB, a 405b-wide one 6.4 GB, the embeddings and the
output 2.1 / 4.2 GB each) and removed after their runs unless --keep. Not a test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def timed(args: list[str], work: Path) -> dict:
    """One `python -m harness ARGS` under /usr/bin/time -v: wall seconds, peak RSS (GiB), exit code, last line."""
    with tempfile.NamedTemporaryFile("r", dir=work, suffix=".time") as stats:
        cmd = ["/usr/bin/time", "-v", "-o", stats.name, sys.executable, "-m", "harness", *args]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        text = stats.read()
    if proc.returncode not in (0, 1):
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(args)}\n{proc.stdout}\n{proc.stderr}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)[1]
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)[1]) * 1024 / GIB
    lines = proc.stdout.strip().splitlines()
    verdict = next((line.split(":")[0] for line in lines if line.startswith(("PASS", "FAIL"))), "")
    return dict(
        args=" ".join(args),
        wall_s=round(seconds, 1),
        peak_rss_gib=round(peak, 2),
        exit=proc.returncode,
        verdict=verdict,
    )


def size_gib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.iterdir()) / GIB, 2)


def shape_runs(work: Path, shape: str, layers: int, ranges: list[str], keep: bool) -> list[dict]:
    """make-tiny SHAPE --layers N, a bfloat16 verify of it, and a verify of each range; the checkpoint removed after."""
    ckpt = work / f"{shape}-{layers}"
    rows = []
    if not ckpt.exists():
        rows.append(
            dict(
                what=f"make-tiny --shape {shape} --layers {layers}",
                **timed(["make-tiny", str(ckpt), "--shape", shape, "--layers", str(layers)], work),
            )
        )
    checkpoint = size_gib(ckpt)
    try:
        for layer_range in [None, *ranges]:
            extra = [] if layer_range is None else ["--layers", layer_range]
            out = work / f"verify-{shape}-{layers}"
            what = f"verify {shape} ({layers} layers, {checkpoint} GiB), bfloat16" + (
                f", --layers {layer_range}" if layer_range else ""
            )
            rows.append(
                dict(what=what, **timed(["verify", str(ckpt), "--dtype", "bfloat16", "--out", str(out), *extra], work))
            )
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(ckpt, ignore_errors=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the checkpoints (tens of GB free)")
    p.add_argument("--only", default="tiny,70b,405b,8b", help="comma-separated: tiny, 70b, 405b, 8b")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    wanted, rows = args.only.split(","), []
    if "tiny" in wanted:
        tiny = args.work / "tiny-3.0"
        if not tiny.exists():
            timed(["make-tiny", str(tiny)], args.work)
        out = str(args.work / "verify-tiny")
        rows.append(
            dict(
                what="verify tiny, bfloat16",
                **timed(["verify", str(tiny), "--dtype", "bfloat16", "--out", out], args.work),
            )
        )
    if "70b" in wanted:
        rows += shape_runs(args.work, "70b-wide", 2, [], args.keep)
        rows += shape_runs(args.work, "70b-wide", 6, ["2:4"], args.keep)
    if "405b" in wanted:
        rows += shape_runs(args.work, "405b-wide", 2, [], args.keep)
    if "8b" in wanted:
        rows += shape_runs(args.work, "8b", 32, [], args.keep)
    machine = f"{platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    print(f"measured {datetime.date.today()} on {machine}\n")
    print("| what | wall | peak RSS | verdict |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['what']} | {row['wall_s']} s | {row['peak_rss_gib']} GiB | {row['verdict']} |")
    if args.json:
        args.json.write_text(json.dumps(dict(date=str(datetime.date.today()), machine=machine, rows=rows), indent=1))


if __name__ == "__main__":
    main()
