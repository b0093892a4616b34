"""Benchmark: issue 20's batches, as `verify --prompts` runs them: prompts of 1, 5, 17 and 60 tokens, left and right
padded, for the scratch forward, examples/my_llama.py and the Hugging Face reference, on every tiny variant, in
float32 and bfloat16; each run's verdict, per-sequence largest ratio and wall time.

    python benchmarks/batches.py [--work DIR] [--json OUT] [--variants 3.0,3.1,3.2] [--dtypes float32,bfloat16]

The truth (the reference with its float64 oracle on each sequence alone) does not depend on the padding or the
implementation: it is traced once per variant and dtype, as `verify --prompts` traces it, and each batched run is
compared with it as `verify` compares. Not a test: tests/test_batch.py holds the verdicts on tiny 3.0; this is the
whole grid, for docs/batches.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import names as canon  # noqa: E402
from harness.batch_run import trace_batched, trace_truth  # noqa: E402
from harness.compare import compare_traces  # noqa: E402
from harness.implementation import builtin, resolve  # noqa: E402
from harness.run import DEFAULT_PROMPT, make_run, prompt_tokens  # noqa: E402
from harness.tiny import make_tiny  # noqa: E402

IMPLS = {"scratch": "scratch", "my_llama": f"{ROOT / 'examples' / 'my_llama.py'}:forward", "reference": "reference"}
COUNTS = (1, 5, 17, 60)


def exact_prompts(ckpt: Path) -> list[str]:
    """Prompts of exactly COUNTS tokens (with <|begin_of_text|>), cut from the default prompt repeated."""
    text = (DEFAULT_PROMPT + " ") * 8
    return [next(text[:n] for n in range(len(text)) if len(prompt_tokens(ckpt, text[:n])) == c) for c in COUNTS]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=None, help="folder for checkpoints and verify outputs (default: a temp one)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--variants", default="3.0,3.1,3.2")
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="batches-"))
    rows = []
    print(f"{'variant':<8}{'dtype':<10}{'padding':<8}{'impl':<10}{'verdict':<9}{'ratios per sequence':<28}{'s':>6}")
    for variant in args.variants.split(","):
        ckpt = work / f"tiny-{variant}"
        if not ckpt.exists():
            make_tiny(ckpt, variant=variant)
        prompts = exact_prompts(ckpt)
        for dtype in args.dtypes.split(","):
            truth = work / f"truth-{variant}-{dtype}.h5"
            start = time.perf_counter()
            trace_truth(make_run(ckpt, prompts=prompts, dtype=dtype), builtin("reference"), truth)
            print(f"{variant:<8}{dtype:<10}{'':<8}{'truth':<10}{'':<9}{'':<28}{time.perf_counter() - start:>6.1f}")
            for padding in ("left", "right"):
                run = make_run(ckpt, prompts=prompts, dtype=dtype, padding=padding)
                for name, impl in IMPLS.items():
                    start = time.perf_counter()
                    trace_batched(run, resolve(impl), work / "batched.h5")
                    c = compare_traces(truth, work / "batched.h5")
                    wall = time.perf_counter() - start
                    ratios = [
                        max(r.ratio for r in c.results if canon.split_batch(r.name)[0] == b) for b in range(len(COUNTS))
                    ]
                    row = dict(variant=variant, dtype=dtype, padding=padding, impl=name, passed=c.passed)
                    row.update(first_divergence=c.first_divergence, names=len(c.results), ratios=ratios)
                    row.update(seconds=round(wall, 1))
                    rows.append(row)
                    shown = " ".join(f"{r:.3f}" for r in ratios)
                    verdict = "PASS" if c.passed else "FAIL"
                    print(
                        f"{variant:<8}{dtype:<10}{padding:<8}{name:<10}{verdict:<9}{shown:<28}{wall:>6.1f}", flush=True
                    )
    worst = max(max(r["ratios"]) for r in rows)
    print(f"{sum(r['passed'] for r in rows)}/{len(rows)} runs passed; largest ratio {worst:.3f}")
    if args.json:
        meta = dict(date=datetime.date.today().isoformat(), machine=platform.platform(), counts=COUNTS)
        Path(args.json).write_text(json.dumps(dict(meta, rows=rows), indent=1))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
