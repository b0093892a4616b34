"""Separation benchmark: how far correct runs stay below compare's bound, and how far bugs sit above it.

    python benchmarks/separation.py [--quick] [--work DIR] [--json OUT] [--sweep [--address ADDR]]

Sweeps the envelope users run: prompt lengths 1 to 1024 tokens, every tiny variant (3.0, 3.1, 3.2), several seeds,
float32/bfloat16/float16, the per-head, vectorized and fused (SDPA) scratch forwards and scratch variants with other
legitimate precision choices (monkeypatched, as tests/test_mutations.py does). Prints, per dtype and prompt length,
the largest ratio (error / bound) of any correct run and the smallest ratio of any catalogued mutant at its own name.
Targets: correct <= 0.5, mutants >= 10. Not a test: a few minutes with --quick on 2 cores, longer without.
`--sweep` runs the same groups (one reference trace and the runs judged against it) as Ray tasks, on a local Ray or a
cluster at `--address` (docs/sweep.md): the same table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from harness import scratch  # noqa: E402
from harness.checkpoint import open_checkpoint  # noqa: E402
from harness.compare import compare_traces  # noqa: E402
from harness.run import trace_reference, trace_scratch  # noqa: E402
from harness.tiny import CORPUS, make_tiny_meta  # noqa: E402
from harness.tokenizer import load_tokenizer  # noqa: E402

SHORT_PROMPTS = {1: "", 2: "a", 3: "a b", 4: "the answer is"}  # 1-4 tokens with BOS (the tiny BPE: "the" is one token)


# ---- implementations with other legitimate precision choices (each real code makes) --------------------------------


def _norm_float32_then_cast(original, dtype):
    """Hugging Face: normalise in float32, cast back, then multiply by the weight in the working dtype."""

    def rms_norm(x, weight, eps):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight

    return rms_norm


def _norm_weight_float32(original, dtype):
    """Some libraries: normalise and multiply by the weight in float32, cast once at the end."""

    def rms_norm(x, weight, eps):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)

    return rms_norm


def _rope_working_dtype(original, dtype):
    """Hugging Face: cos/sin cast to the working dtype, the rotation (and so the scores) in the working dtype."""

    def rotate(x, freqs_cis):
        cos, sin = freqs_cis.real.to(x.dtype), freqs_cis.imag.to(x.dtype)  # [T, hd/2]
        pairs = x.unflatten(-1, (-1, 2))  # [..., T, hd/2, 2]
        even, odd = pairs[..., 0], pairs[..., 1]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)  # [..., T, hd]

    return rotate


def _softmax_working_dtype(original, dtype):
    """Scores in float32, softmax in the working dtype (masked scores cast down first)."""
    return lambda masked_scores: torch.nn.functional.softmax(masked_scores.to(dtype), dim=1)


# (label, [(scratch function, make(original, dtype))], vectorized)
IMPLEMENTATIONS: list[tuple[str, list[tuple[str, Callable]], bool]] = [
    ("scratch", [], False),
    ("vectorized", [], True),
    ("sdpa", [("attention", lambda original, dtype: scratch.attention_sdpa)], False),  # fused: no scores, no probs
    ("norm-f32-cast", [("rms_norm", _norm_float32_then_cast)], False),
    ("norm-weight-f32", [("rms_norm", _norm_weight_float32)], False),
    ("rope-working", [("rotate", _rope_working_dtype)], False),
    ("softmax-working", [("softmax", _softmax_working_dtype)], False),
    ("hf-like", [("rms_norm", _norm_float32_then_cast), ("rotate", _rope_working_dtype)], False),
]


def _patched(patches, dtype: torch.dtype | None):
    import pytest

    mp = pytest.MonkeyPatch()
    for target, make in patches:
        mp.setattr(scratch, target, make(getattr(scratch, target), dtype))
    return mp


def prompt_of_length(tokenizer_path: Path, n: int) -> str:
    """A prompt of about `n` tokens (BOS included): the issue's short prompts, else a prefix of the tiny corpus."""
    enc = load_tokenizer(tokenizer_path)
    if n in SHORT_PROMPTS:
        prompt = SHORT_PROMPTS[n]
        assert len(enc.encode(prompt)) == n - 1, f"{prompt!r} is not {n - 1} tokens with this tokenizer"
        return prompt
    text = CORPUS.read_text(encoding="utf-8")
    ids = enc.encode(text * (1 + 2 * n // max(1, len(enc.encode(text)))))[: n - 1]
    return enc.decode(ids)


# ---- the sweep: groups of runs that share a reference trace, run here one after another or as Ray tasks ------------


def checkpoint(work: Path, variant: str, seed: int):
    out = work / f"tiny-{variant}-{seed}"
    if not out.exists():
        make_tiny_meta(out, seed=seed, variant=variant)
    return open_checkpoint(out)


def correct_group(work: str, variant: str, seed: int, dtype: str, n: int, labels: list[str]) -> dict:
    """One reference trace (with its oracle) and each implementation of `labels` against it: their largest ratios."""
    ckpt = open_checkpoint(Path(work) / f"tiny-{variant}-{seed}")
    tag = f"{variant}-{seed}-{dtype}-{n}"
    ref, path = Path(work) / f"ref-{tag}.h5", Path(work) / f"impl-{tag}.h5"
    prompt = prompt_of_length(ckpt.tokenizer_path, n)
    trace_reference(ckpt, ref, prompt=prompt, dtype=dtype, oracle=True)
    runs = []
    for label, patches, vectorized in [i for i in IMPLEMENTATIONS if i[0] in labels]:
        mp = _patched(patches, getattr(torch, dtype))
        try:
            trace_scratch(ckpt, path, prompt=prompt, dtype=dtype, vectorized=vectorized)
        finally:
            mp.undo()
        c = compare_traces(ref, path)
        top = max(c.results, key=lambda r: r.ratio)
        runs.append(
            dict(
                label=label, T=len(c.tokens), ratio=top.ratio, name=top.name, passed=c.passed, first=c.first_divergence
            )
        )
    ref.unlink()
    path.unlink()
    return {"runs": runs}


def mutant_group(work: str, dtype: str, n: int) -> dict:
    """One reference trace of tiny 3.0 seed 0 and each catalogued mutant against it: its first divergence and the
    ratio at its own name."""
    sys.path.insert(0, str(ROOT))  # tests.mutants, in a Ray worker too
    from tests.mutants import FORWARD as CATALOGUE

    ckpt = open_checkpoint(Path(work) / "tiny-3.0-0")
    ref, path = Path(work) / f"ref-mutants-{dtype}-{n}.h5", Path(work) / f"mutant-{dtype}-{n}.h5"
    prompt = prompt_of_length(ckpt.tokenizer_path, n)
    trace_reference(ckpt, ref, prompt=prompt, dtype=dtype, oracle=True)
    runs = []
    for m in CATALOGUE:
        mp = _patched([(m.target, lambda original, _dt, m=m: m.make(original, ckpt.config))], None)
        try:
            trace_scratch(ckpt, path, prompt=prompt, dtype=dtype)
        finally:
            mp.undo()
        c = compare_traces(ref, path)
        own = c.result(m.first)
        runs.append(
            dict(id=m.id, T=len(c.tokens), first=c.first_divergence, own=m.first, ratio=own.ratio if own else None)
        )
    ref.unlink()
    path.unlink()
    return {"runs": runs}


def fold_correct(group: dict, runs: list[dict], rows: dict, worst: dict) -> None:
    """A correct group's runs into the table: the largest ratio per (dtype, T), which run it was; false alarms said."""
    variant, seed, dtype = group["variant"], group["seed"], group["dtype"]
    for run in runs:
        key = (dtype, run["T"])
        rows[key]["correct"] = max(rows[key].get("correct", 0.0), run["ratio"])
        if run["ratio"] > worst.get(key, (0.0,))[0]:
            worst[key] = (run["ratio"], f"{variant} seed {seed} {run['label']}: {run['name']}")
        if not run["passed"]:
            print(
                f"  FALSE ALARM {variant} seed {seed} {dtype} T={run['T']} {run['label']}: "
                f"{run['first']} at {run['ratio']:.3g}x",
                flush=True,
            )


def fold_mutants(group: dict, runs: list[dict], rows: dict, weakest: dict, misses: list) -> None:
    """A mutant group's runs into the table: the smallest ratio at a mutant's own name; a mutant first elsewhere, a
    miss."""
    for run in runs:
        key = (group["dtype"], run["T"])
        ratio = run["ratio"] if run["ratio"] is not None else float("nan")
        if run["first"] != run["own"]:
            misses.append(f"{run['id']} {group['dtype']} T={run['T']}: first {run['first']}, own name at {ratio:.3g}x")
            continue
        if ratio < rows[key].get("mutant", float("inf")):
            rows[key]["mutant"] = ratio
            weakest[key] = run["id"]


def groups(work: Path, variants, seeds, dtypes, lengths, impls, mutant_lengths) -> list[dict]:
    """Every group of the sweep, in the order the serial run goes: the correct runs, then the mutants."""
    labels = [i[0] for i in impls]
    found = [
        dict(kind="correct", work=str(work), variant=v, seed=s, dtype=d, n=n, labels=labels)
        for v in variants
        for s in seeds
        for d in dtypes
        for n in lengths
    ]
    return found + [dict(kind="mutants", work=str(work), dtype=d, n=n) for d in dtypes for n in mutant_lengths]


def run_group(group: dict) -> dict:
    kwargs = {k: v for k, v in group.items() if k != "kind"}
    return correct_group(**kwargs) if group["kind"] == "correct" else mutant_group(**kwargs)


def run_serial(found: list[dict]) -> list[dict | None]:
    return [run_group(group) for group in found]


def run_on_ray(found: list[dict], work: Path, address: str | None) -> list[dict | None]:
    """Each group a Ray task (harness/sweep_ray.py, as `python -m harness sweep`), asking for a tiny verify's memory;
    a group that fails is said and left out of the table."""
    from harness.sweep import estimate_memory
    from harness.sweep_ray import Task, ray_session, run_tasks

    config = open_checkpoint(work / "tiny-3.0-0").config
    tasks = [
        Task(
            "-".join(str(v) for k, v in g.items() if k not in ("work", "labels")),
            " ".join(str(v) for k, v in g.items() if k not in ("work", "labels")),
            estimate_memory(config, g["n"], g["dtype"]),
            {"group": g},
        )
        for g in found
    ]
    with ray_session(address) as ray:
        print(f"Ray: {int(ray.cluster_resources().get('CPU', 0))} CPUs, {len(tasks)} tasks", flush=True)
        records = run_tasks(tasks, run_group, work / "sweep-results")
    for record in records:
        if record["status"] != "done":
            print(f"  {record['name']}: {record['status']}: {record['error']}", flush=True)
    return [record["result"] if record["status"] == "done" else None for record in records]


def print_table(rows: dict, worst: dict, weakest: dict, misses: list, dtypes, header: str) -> None:
    print(f"\n{header}")
    print("| dtype | prompt (T) | worst correct run | ratio | weakest mutant | ratio |\n|---|---|---|---|---|---|")
    for (dtype, n), row in sorted(rows.items(), key=lambda kv: (dtypes.index(kv[0][0]), kv[0][1])):
        c, mu = row.get("correct"), row.get("mutant")
        print(
            f"| {dtype} | {n} | {worst.get((dtype, n), ('', '-'))[1]} | {'-' if c is None else f'{c:.3g}'} | "
            f"{weakest.get((dtype, n), '-')} | {'-' if mu is None else f'{mu:.3g}'} |"
        )
    if misses:
        print("\nmutants not first at their own name:\n  " + "\n  ".join(misses))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Fewer variants, seeds, lengths and implementations")
    p.add_argument("--work", type=Path, help="Scratch folder (default: a temporary one; shared storage for a cluster)")
    p.add_argument("--json", type=Path, help="Write the table as JSON")
    p.add_argument("--variants", help="Comma-separated tiny variants (overrides the sweep's)")
    p.add_argument("--seeds", help="Comma-separated seeds")
    p.add_argument("--dtypes", help="Comma-separated dtypes")
    p.add_argument("--lengths", help="Comma-separated prompt lengths of the correct runs")
    p.add_argument("--mutant-lengths", help="Comma-separated prompt lengths of the mutants ('' for none)")
    p.add_argument("--impls", help=f"Comma-separated implementations ({', '.join(i[0] for i in IMPLEMENTATIONS)})")
    p.add_argument("--sweep", action="store_true", help="Run the groups as Ray tasks (docs/sweep.md), not one by one")
    p.add_argument("--address", help="--sweep on this Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    return p.parse_args()


def grid(args: argparse.Namespace) -> tuple:
    if args.quick:
        variants, seeds, dtypes = ("3.0", "3.2"), (0,), ("float32", "bfloat16")
        lengths, mutant_lengths, impls = (1, 2, 3, 4, 17, 64), (2, 17), IMPLEMENTATIONS[:3] + IMPLEMENTATIONS[-1:]
    else:
        variants, seeds, dtypes = ("3.0", "3.1", "3.2"), (0, 1, 2, 3, 4), ("float32", "bfloat16", "float16")
        lengths, mutant_lengths, impls = (1, 2, 3, 4, 8, 17, 64, 256, 1024), (1, 2, 3, 17, 256), IMPLEMENTATIONS
    split = lambda text, cast=str: tuple(cast(x) for x in text.split(",") if x)  # noqa: E731
    variants = split(args.variants) if args.variants else variants
    seeds = split(args.seeds, int) if args.seeds else seeds
    dtypes = split(args.dtypes) if args.dtypes else dtypes
    lengths = split(args.lengths, int) if args.lengths is not None else lengths
    mutant_lengths = split(args.mutant_lengths, int) if args.mutant_lengths is not None else mutant_lengths
    impls = [i for i in IMPLEMENTATIONS if i[0] in split(args.impls)] if args.impls else impls
    return variants, seeds, dtypes, lengths, impls, mutant_lengths


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    variants, seeds, dtypes, lengths, impls, mutant_lengths = grid(args)
    rows: dict = defaultdict(dict)
    worst: dict = {}
    weakest: dict = {}
    misses: list[str] = []
    start = time.time()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        for variant in variants:
            for seed in seeds:
                checkpoint(work, variant, seed)
        if mutant_lengths:
            checkpoint(work, "3.0", 0)
        found = groups(work, variants, seeds, dtypes, lengths, impls, mutant_lengths)
        results = run_on_ray(found, work, args.address) if args.sweep else run_serial(found)
    for group, result in zip(found, results):
        if result is not None and group["kind"] == "correct":
            fold_correct(group, result["runs"], rows, worst)
        elif result is not None:
            fold_mutants(group, result["runs"], rows, weakest, misses)
    how = (" (--quick)" if args.quick else "") + (" (--sweep)" if args.sweep else "")
    header = f"{datetime.date.today()} {platform.node()} torch {torch.__version__}, {time.time() - start:.0f} s{how}"
    print_table(rows, worst, weakest, misses, dtypes, header)
    if args.json:
        args.json.write_text(json.dumps({f"{d}-{n}": r for (d, n), r in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
