"""Benchmark: `verify` on long prompts, wall time, peak RSS and output bytes, per prompt length (issue 14).

    python benchmarks/long_prompts.py [--work DIR] [--tiny 128,512,2048,8192] [--wide 512,2048] [--phases] [--json OUT]

The prompt is harness/data/tiny_corpus.txt repeated and cut to T tokens with `<|begin_of_text|>` (the tiny tokenizer is
also the 8b-wide checkpoint's). Each run is a fresh subprocess (`python -m harness verify ... --dtype bfloat16`), its
peak RSS from wait4 (the child's own high-water mark, not the sum of its children). `--phases` also runs the three
parts of verify separately: `trace --impl reference`, `trace` (the scratch forward) and `compare`, to tell tracing
from comparing. Targets: tiny 3.1 at 8192 tokens in 10 minutes, 8 GiB RSS and 1 GiB of output; 8b-wide at 2048 within
1.3 x its checkpoint size + 4 GiB of RSS. Not a test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, ensure, harness, machine, run  # noqa: E402  (benchmarks/run.py: subprocess, wait4, make-tiny)

CORPUS = ROOT / "harness" / "data" / "tiny_corpus.txt"
TINY_TARGET = dict(wall_s=600, rss_gib=8.0, out_gib=1.0)


def prompt_of_length(checkpoint: Path, n_tokens: int) -> tuple[str, int]:
    """The corpus repeated and cut so that `[<|begin_of_text|>] + encode(prompt)` holds n_tokens (or the fewest more).

    Returns (prompt, its token count). The shortest prefix of the repeated text reaching n_tokens, by bisection."""
    from harness.checkpoint import open_checkpoint
    from harness.run import prompt_tokens
    from harness.tokenizer import encode_prompt, load_tokenizer

    enc = load_tokenizer(open_checkpoint(checkpoint).tokenizer_path)
    corpus = CORPUS.read_text(encoding="utf-8")
    text = corpus
    while len(encode_prompt(enc, text)) < n_tokens:
        text += corpus
    low, high = 0, len(text)  # encode(text[:high]) reaches n_tokens; find the shortest such prefix
    while low < high:
        mid = (low + high) // 2
        if len(encode_prompt(enc, text[:mid])) >= n_tokens:
            high = mid
        else:
            low = mid + 1
    prompt = text[:high]
    return prompt, len(prompt_tokens(open_checkpoint(checkpoint), prompt, enc))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(label: str, checkpoint: Path, n_tokens: int, work: Path, phases: bool) -> list[dict]:
    prompt, count = prompt_of_length(checkpoint, n_tokens)
    prompt_file = work / f"prompt-{label}-{n_tokens}.txt"
    prompt_file.write_text(prompt, encoding="utf-8")
    out = work / f"verify-{label}-{n_tokens}"
    common = ["--prompt-file", str(prompt_file), "--dtype", "bfloat16"]
    rows = []

    def add(what: str, wall: float, rss: float, nbytes: int | None, note: str = "") -> None:
        rows.append(
            dict(
                shape=label,
                tokens=count,
                what=what,
                wall_s=round(wall, 1),
                peak_rss_gib=round(rss, 2),
                bytes=nbytes,
                note=note,
            )
        )
        shown = "" if nbytes is None else f"{nbytes / 2**20:9.1f} MiB"
        print(f"{label:8} {count:6} {what:22} {wall:8.1f} s {rss:7.2f} GiB {shown:>13}  {note}", flush=True)

    if phases:
        parts = work / f"phases-{label}-{n_tokens}"
        parts.mkdir(exist_ok=True)
        ref, mine = parts / "reference.h5", parts / "scratch.h5"
        wall, rss, _ = run(harness("trace", str(checkpoint), "--impl", "reference", "--out", str(ref), *common))
        add("trace reference", wall, rss, ref.stat().st_size)
        wall, rss, _ = run(harness("trace", str(checkpoint), "--out", str(mine), *common))
        add("trace scratch", wall, rss, mine.stat().st_size)
        wall, rss, output = run(harness("compare", str(ref), str(mine)))
        add("compare", wall, rss, None, _verdict(output))
    wall, rss, output = run(harness("verify", str(checkpoint), "--out", str(out), *common))
    printed = next((line for line in output.splitlines() if line.startswith("prompt:")), "")
    add("verify", wall, rss, folder_bytes(out), f"{_verdict(output)}; CLI: {printed[:40]}")
    return rows


def _verdict(output: str) -> str:
    return next((line for line in output.splitlines() if line.startswith(("PASS", "FAIL"))), "no verdict")[:60]


def sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/llama3-long", help="where checkpoints, prompts and outputs go")
    parser.add_argument(
        "--tiny", default="128,512,2048,8192", help="prompt lengths on the tiny 3.1 checkpoint ('' for none)"
    )
    parser.add_argument("--wide", default="512,2048", help="prompt lengths on the 8b-wide checkpoint ('' for none)")
    parser.add_argument(
        "--phases", action="store_true", help="also time trace reference, trace scratch and compare apart"
    )
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{'shape':8} {'tokens':>6} {'what':22} {'wall':>10} {'peak RSS':>11} {'output':>13}")
    rows: list[dict] = []
    if sizes(args.tiny):
        tiny = ensure(work / "tiny-3.1", "--variant", "3.1")
        for n in sizes(args.tiny):
            rows += measure("tiny-3.1", tiny, n, work, args.phases)
    if sizes(args.wide):
        wide = ensure(work / "8b-wide", "--shape", "8b-wide")
        size = (wide / "consolidated.00.pth").stat().st_size / 2**30
        print(f"8b-wide checkpoint {size:.2f} GiB: RSS target 1.3 x {size:.2f} + 4 = {1.3 * size + 4:.2f} GiB")
        for n in sizes(args.wide):
            rows += measure("8b-wide", wide, n, work, args.phases)
    header = f"{datetime.date.today()}, {machine()}, torch {__import__('torch').__version__}"
    print(header)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=header, rows=rows), indent=1))


if __name__ == "__main__":
    main()
