"""How a pooled floor would judge a generation: the worst ratio of each comparison.json, as compare.py judges it today
and with each decode step's per-head floors pooled over the heads of their layer (RMS, or the largest).

    python benchmarks/generation_floors.py OUT/comparison.json [...]

A decode step's per-head tensors are one query row, so the reference's floor on them is one draw of rounding error
(README: Generation, "Known limitation"). A measurement for harness/compare.py, not a rule: the bound here is
compare's own (FLOOR_FACTOR x (floor + ABS_TERM_ULPS u)) with only the floor replaced.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict

from harness import names
from harness.compare import ABS_TERM_ULPS, FLOOR_FACTOR, UNIT_ROUNDOFF


def pooled_worst(results: list[dict], pool=lambda floors: math.sqrt(sum(f * f for f in floors) / len(floors))) -> tuple[float, str]:
    groups = defaultdict(list)
    for r in results:
        step, base = names.split_step(r["name"])
        layer, head, part = names.parse(base)
        key = (step, layer, part) if step and head is not None else r["name"]  # decode-step per-head names pool
        groups[key].append(r)
    worst, where = 0.0, ""
    for rs in groups.values():
        floor = pool([r["floor"] for r in rs])
        for r in rs:
            u = UNIT_ROUNDOFF.get(r["dtype_b"], UNIT_ROUNDOFF["float32"])
            ratio = r["rel_l2"] / (FLOOR_FACTOR * (floor + ABS_TERM_ULPS * u))
            if ratio > worst:
                worst, where = ratio, r["name"]
    return worst, where


def main(paths: list[str]) -> None:
    for path in paths:
        data = json.load(open(path))
        results = [r for r in data["results"] if r.get("floor") is not None]
        failed = [r for r in data["results"] if not r["passed"]]
        today = max(data["results"], key=lambda r: r["ratio"])
        rms, rms_at = pooled_worst(results)
        top, top_at = pooled_worst(results, max)
        print(f"{path}: {len(failed)}/{len(data['results'])} fail today (worst {today['ratio']:.3g} at {today['name']}); "
              f"floors pooled over heads: RMS worst {rms:.3g} at {rms_at}, max worst {top:.3g} at {top_at}")


if __name__ == "__main__":
    main(sys.argv[1:])
