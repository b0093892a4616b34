"""Benchmark: llama.cpp's RoPE drift with position, F32 GGUF of tiny 3.0 against the float32 reference (issue 22.2).

    python benchmarks/llamacpp_rope.py [--work DIR] [--tokens 256,1024,4096,8192] [--converter PATH] [--json OUT]

llama.cpp builds each rotation angle by repeated multiplication (theta_i = p * base^(-2i/d) as a running product), so
its float32 error in `q_rotated` grows with the position p, where `q` (before RoPE) does not. For each prompt length
(harness/data/tiny_corpus.txt repeated, benchmarks/long_prompts.py's prompts) both sides record q and q_rotated only;
`compare` judges them and, past 511 tokens, each block of 256 positions: printed per block, the worst over every
layer and head. Says whether q_rotated stays within the bound at the longest length. Needs llama_cpp and the converter
($LLAMA_CPP_CONVERTER or --converter). Not a test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_prompts import prompt_of_length  # noqa: E402
from run import ensure, machine  # noqa: E402

NAMES = ["layers.*.attention.heads.*.q", "layers.*.attention.heads.*.q_rotated"]


def measure(checkpoint: Path, gguf: Path, n_tokens: int, work: Path) -> dict:
    """Both traces of one prompt length, compared: per part (q, q_rotated) the worst ratio and, per block of
    positions, the worst ratio over every layer and head."""
    from harness.compare import compare_traces
    from harness.implementation import Implementation, builtin
    from harness.llamacpp import llamacpp_forward
    from harness.progress import quiet_transformers
    from harness.run import make_run, trace

    prompt, count = prompt_of_length(checkpoint, n_tokens)
    run = make_run(checkpoint, prompt=prompt, dtype="float32", names=NAMES)
    start = time.perf_counter()
    with quiet_transformers():
        trace(run, builtin("reference"), work / f"reference-{count}.h5")
    reference_s = time.perf_counter() - start
    start = time.perf_counter()
    spec = f"llamacpp:{gguf}"
    forward, metadata, _ = llamacpp_forward(spec, names=NAMES)
    trace(run, Implementation(spec, forward, metadata), work / f"llamacpp-{count}.h5")
    llamacpp_s = time.perf_counter() - start
    results = compare_traces(work / f"reference-{count}.h5", work / f"llamacpp-{count}.h5").results
    row = dict(tokens=count, reference_s=round(reference_s, 1), llamacpp_s=round(llamacpp_s, 1))
    for part in ("q", "q_rotated"):
        mine = [r for r in results if r.name.endswith(f".{part}")]
        worst = max(mine, key=lambda r: r.ratio)
        row[part] = dict(worst_ratio=round(worst.ratio, 3), at=worst.name, position=worst.worst_position)
        by_block: dict[str, float] = {}
        for r in mine:
            for block in r.blocks or [dict(positions=[0, count - 1], ratio=r.ratio)]:
                span = "{}-{}".format(*block["positions"])  # first and last position of the block
                by_block[span] = max(by_block.get(span, 0.0), round(block["ratio"], 3))
        row[part]["blocks"] = by_block
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/harness-llamacpp-rope"))
    parser.add_argument("--tokens", default="256,1024,4096,8192", help="prompt lengths, comma-separated")
    parser.add_argument("--converter", help="llama.cpp's converter (default: $LLAMA_CPP_CONVERTER)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    from harness.gguf_convert import write_gguf

    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = ensure(args.work / "tiny-3.0", "--variant", "3.0")
    gguf = args.work / "tiny-3.0-f32.gguf"
    if not gguf.exists():
        write_gguf(checkpoint, gguf, outtype="f32", converter=args.converter)
    print(f"{datetime.date.today()}, {machine()}; tiny 3.0, F32 GGUF, float32 reference", flush=True)
    rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        row = measure(checkpoint, gguf, n, args.work)
        rows.append(row)
        q, rotated = row["q"], row["q_rotated"]
        print(
            f"{row['tokens']:6} tokens: q worst {q['worst_ratio']:.3f}, q_rotated worst {rotated['worst_ratio']:.3f} "
            f"at {rotated['at']} pos {rotated['position']} (reference {row['reference_s']} s, llama.cpp "
            f"{row['llamacpp_s']} s)",
            flush=True,
        )
        print(
            "        q_rotated per block: " + ", ".join(f"{k}: {v}" for k, v in rotated["blocks"].items()), flush=True
        )
    last = rows[-1]["q_rotated"]["worst_ratio"]
    verdict = "within" if last <= 1 else "OUTSIDE"
    print(f"at {rows[-1]['tokens']} tokens llama.cpp's F32 q_rotated is {verdict} the bound (worst ratio {last:.3f})")
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine(), date=str(datetime.date.today()), rows=rows), indent=1))


if __name__ == "__main__":
    main()
