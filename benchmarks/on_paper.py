"""On paper: a whole Llama-3-70B (80 layers) and 405B (126 layers) verified in bfloat16, on this machine and on 16.

    python benchmarks/on_paper.py [--nodes 16] [--disk-gb-s R]

Not a measurement: arithmetic on the per-layer time and memory that benchmarks/sizes.py and benchmarks/run.py measured
here at the 70B's and 405B's width (the MEASURED table below, with where each figure came from). The assumptions
(docs/performance.md, on paper, repeats them with the table):

- A verify of N layers costs F + N m: m, one layer's marginal time, is the 2- and 6-layer 70b-wide verifies'
  difference over 4; F, the rest (imports, embeddings, logits, report), is the 2-layer time less 2 m.
- Of m, r is the reference's own bfloat16 forward (its 2- and 6-layer difference over 4); the rest, m - r, is the
  float64 oracle, the implementation and the comparison of one layer: what a `--layers A:B` job pays for B - A
  layers, while its reference runs all B (docs/any-size.md).
- At the 405B's width each per-layer cost is the 70B's times the ratio of a layer's weights (6.37 / 1.71 GB: reads,
  float64 casts and 17-token matmuls all scale with them); F405 is the measured 2-layer 405b-wide time less 2 m405
  (for the "loaded" inputs, which have no 405b-wide run, scaled as the 70B's F is).
- The measured layers were read mostly from the page cache (the test checkpoints fit it); a real 70B (140 GB) or
  405B (810 GB) does not, so each layer is read from disk three times (reference, oracle, implementation; a range
  job's reference-only layers once) at the disk rate, added to m in full (no overlap with computing); the output
  matrix three times, added to F.
- Peak memory does not grow with depth (measured: 2 and 6 layers at the 70B's width, 2 and 32 at the 8B's), so the
  whole model peaks as the 2-layer shape did.
- The cluster: 16 nodes of this machine's size (2 cores, 24 GiB), one job each, the checkpoint on shared storage
  that gives every node this machine's disk rate at once; jobs `--layers A:B` with ranges chosen so that every job
  takes about as long (later ranges shorter: their reference runs from layer 0). `sweep --layers auto` keeps a model
  whole on any node that holds one job (its memory estimate no longer grows with depth), so the ranges are given.
"""

from __future__ import annotations

import argparse

GB = 1e9

# Measured on this project's machine (2 cores, 24 GiB RAM, no swap), 2026-11-30, bfloat16 verify of the default
# 17-token prompt, scratch against the reference with its float64 oracle, wall seconds and peak RSS (GiB).
MEASURED = {
    # benchmarks/sizes.py (docs/performance.md, any size), other sessions' tests beside it
    "calm": dict(verify70={2: 60.4, 6: 117.1}, verify405={2: 169.6}),
    # rerun for this table, back to back (/usr/bin/time -v), two other sessions' runs and a compile beside (load 5-6)
    "loaded": dict(verify70={2: 186.3, 6: 313.8}, verify405=None),
}
PEAK_GIB = {"70b": 2.10, "405b": 6.43}  # benchmarks/sizes.py: 70b-wide 2 / 6 layers 2.07 / 2.10, 405b-wide 2 layers
# The reference's own bfloat16 forward, tracing off (benchmarks/run.py REFERENCE_TIMER), 70b-wide with 2 and 6 layers,
# measured beside the "loaded" verifies: its share of a layer's marginal time there is taken as its share in both.
REFERENCE70 = {2: 35.8, 6: 54.3}  # seconds; its float64 oracle apart: 66.9 and 88.3 s
DISK_GB_S = 0.866  # `dd iflag=direct bs=64M count=64` of the 70b-wide checkpoint: 4 GiB in 4.96 s, no page cache
OUTPUT_BYTES = 2 * 128256  # bytes of the output matrix a unit of dim: read 3 times by a job that ends at the logits

# (dim, n_heads, n_kv_heads, ffn_dim, n_layers), head_dim 128: Meta-Llama-3-70B and Llama-3.1-405B.
SHAPES = {"70b": (8192, 64, 8, 28672, 80), "405b": (16384, 128, 8, 53248, 126)}


def layer_bytes(model: str) -> float:
    """One decoder layer's weights in bfloat16: wq, wk, wv, wo, w1, w2, w3 and two norms."""
    dim, heads, kv, ffn, _ = SHAPES[model]
    return 2 * (dim * 128 * (2 * heads + 2 * kv) + 3 * dim * ffn + 2 * dim)


def per_layer(inputs: dict, model: str, disk: float) -> tuple[float, float, float]:
    """(F, m, r) of `model` in seconds: fixed cost, marginal cost of a judged layer, the reference's part of it; m
    and r with their disk reads (3 reads and 1) added."""
    v70, scale = inputs["verify70"], layer_bytes("405b") / layer_bytes("70b")
    marginal = {name: (i["verify70"][6] - i["verify70"][2]) / 4 for name, i in MEASURED.items()}
    m = (v70[6] - v70[2]) / 4
    r = m * (REFERENCE70[6] - REFERENCE70[2]) / 4 / marginal["loaded"]
    fixed = v70[2] - 2 * m
    if model == "405b":
        calm = MEASURED["calm"]
        fixed405 = calm["verify405"][2] - 2 * marginal["calm"] * scale
        fixed = fixed405 * fixed / (calm["verify70"][2] - 2 * marginal["calm"])  # as the 70B's, loaded or calm
        m, r = m * scale, r * scale
    read = layer_bytes(model) / (disk * GB)
    fixed += 3 * OUTPUT_BYTES * SHAPES[model][0] / (disk * GB)
    return fixed, m + 3 * read, r + read


def balanced_ranges(n: int, nodes: int, fixed: float, m: float, r: float) -> list[tuple[int, int]]:
    """`nodes` consecutive ranges of the n layers, each job fixed + r B + (m - r) (B - A) about the same: the
    smallest time T for which ranges filled greedily up to T cover the model in `nodes` jobs."""

    def fill(limit: float) -> list[tuple[int, int]] | None:
        ranges, a = [], 0
        while a < n:
            b = a + 1
            while b < n and fixed + r * (b + 1) + (m - r) * (b + 1 - a) <= limit:
                b += 1
            ranges.append((a, b))
            a = b
        return ranges if len(ranges) <= nodes else None

    low, high = fixed + m, fixed + m * n
    while high - low > 0.5:
        middle = (low + high) / 2
        low, high = (low, middle) if fill(middle) else (middle, high)
    return fill(high)


def job_time(a: int, b: int, fixed: float, m: float, r: float) -> float:
    return fixed + r * b + (m - r) * (b - a)


def table(name: str, inputs: dict, nodes: int, disk: float) -> list[str]:
    """The markdown table of one input set, then each model's per-layer figures and the ranges of its cluster run."""
    rows = [
        f"inputs: {name}",
        f"| model | layers | peak RSS | this machine | {nodes} nodes | read by all jobs | storage rate it needs |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for model in ("70b", "405b"):
        n = SHAPES[model][4]
        fixed, m, r = per_layer(inputs, model, disk)
        whole = fixed + n * m
        ranges = balanced_ranges(n, nodes, fixed, m, r)
        cluster = max(job_time(a, b, fixed, m, r) for a, b in ranges)
        read = sum(b + 2 * (b - a) for a, b in ranges) * layer_bytes(model) / GB
        rows.append(
            f"| {model.upper()} | {n} | {PEAK_GIB[model]:.2f} GiB | {whole / 3600:.2f} h | {cluster / 60:.0f} min "
            f"| {read / 1000:.1f} TB | {read / cluster:.1f} GB/s |"
        )
        notes.append(
            f"{model.upper()}: F {fixed:.0f} s, m {m:.1f} s a layer (the reference's r {r:.1f} s of it); "
            f"--layers {','.join(f'{a}:{b}' for a, b in ranges)}"
        )
    return rows + [""] + notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=16, help="nodes of this machine's size, one job each")
    p.add_argument("--disk-gb-s", type=float, default=DISK_GB_S, help="each node's read rate from the checkpoint")
    args = p.parse_args()
    for name, inputs in MEASURED.items():
        print("\n".join(table(name, inputs, args.nodes, args.disk_gb_s)), end="\n\n")


if __name__ == "__main__":
    main()
