"""What a sweep shows: a line per job as it finishes, the table, sweep.json and sweep.html; and the merge of a model's
layer ranges into one whole-model comparison (one first divergence), with its comparison.json and report.html.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Any

from . import __version__
from .compare import Comparison, NameResult
from .files import atomic_path
from .names import order_key

GIB = 2**30
VERDICTS = {"error": "ERROR", "failed": "CRASH"}  # a job's status other than done; done: PASS or FAIL


def verdict(record: dict[str, Any]) -> str:
    if record["status"] != "done":
        return VERDICTS[record["status"]]
    return "PASS" if record["result"]["passed"] else "FAIL"


def _ratio(value: Any) -> float:
    """A ratio from JSON ("inf"/"nan" as text); nan counts as the worst."""
    x = float(value) if value is not None else 0.0
    return math.inf if math.isnan(x) else x


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def line(record: dict[str, Any], finished: int, total: int) -> str:
    """One job, as it finishes: `[3/12] NAME: PASS, worst ratio 0.344 at NAME (5.2 s, 0.41 GiB)`."""
    head = f"[{finished}/{total}] {record['name']}: "
    if record.get("skipped"):
        return head + f"{verdict(record)} (done in an earlier run: skipped)"
    if record["status"] != "done":
        return head + f"{verdict(record)}: {record['error']}"
    r = record["result"]
    where = f"first divergence {r['first_divergence']}, " if r["first_divergence"] else ""
    return (
        head + f"{verdict(record)}, {where}worst ratio {_ratio(r['worst_ratio']):.3g} at {r['worst_name']} "
        f"({record['seconds']:.1f} s, {_gib(record['peak_memory'])})"
    )


def _row(record: dict[str, Any]) -> list[str]:
    r = record.get("result") or {}
    done = record["status"] == "done"
    return [
        record["name"],
        verdict(record),
        f"{_ratio(r['worst_ratio']):.3g}" if done and r["worst_name"] else "-",
        (r["first_divergence"] or "none") if done else record["error"],
        f"{record['seconds']:.1f} s" if done else "-",
        _gib(record.get("peak_memory")),
    ]


def summary(records: list[dict[str, Any]]) -> str:
    """`4 jobs (1 done in an earlier run): 1 FAIL, 3 PASS`."""
    counts = Counter(verdict(r) for r in records)
    skipped = sum(1 for r in records if r.get("skipped"))
    done = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
    return f"{len(records)} jobs ({skipped} done in an earlier run): {done}"


COLUMNS = ["job", "verdict", "worst ratio", "first divergence", "time", "peak memory"]


def table(records: list[dict[str, Any]], merged: list[dict[str, Any]]) -> str:
    """The text table: a row per job, then a row per whole model merged from its layer ranges."""
    rows = [_row(r) for r in records]
    rows += [
        [m["name"], "PASS" if m["passed"] else "FAIL", f"{m['worst_ratio']:.3g}", m["first_divergence"] or "none"]
        + ["-", "-"]
        for m in merged
    ]
    widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    widths[3] = min(widths[3], 60)  # an error message is cut here (sweep.json has it whole)
    fmt = lambda row: "  ".join(cell[:w].ljust(w) for cell, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(COLUMNS), *map(fmt, rows)])


def write_sweep(out: Path, records: list[dict], merged: list[dict], notes: list[str], seconds: float) -> None:
    """sweep.json (every record, the merged models, the notes) and sweep.html, each replaced whole."""
    data = {
        "harness": __version__,
        "wall_seconds": seconds,
        "notes": notes,
        "jobs": records,
        "merged": merged,
    }
    with atomic_path(out / "sweep.json") as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    with atomic_path(out / "sweep.html") as tmp:
        tmp.write_text(_page(records, merged, notes, seconds), encoding="utf-8")


def _page(records: list[dict], merged: list[dict], notes: list[str], seconds: float) -> str:
    def cells(row: list[str], link: str | None, kind: str) -> str:
        name = f'<a href="{html.escape(link)}/report.html">{html.escape(row[0])}</a>' if link else html.escape(row[0])
        rest = "".join(f"<td>{html.escape(c)}</td>" for c in row[2:])
        return f'<tr><td>{name}</td><td class="{kind.lower()}">{kind}</td>{rest}</tr>'

    body = [cells(_row(r), r["result"]["folder"] if r["status"] == "done" else None, verdict(r)) for r in records]
    body += [cells(_merged_row(m), m["folder"], "PASS" if m["passed"] else "FAIL") for m in merged]
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>llama3 harness: sweep</title><style>'
        "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} td,th{padding:2px 8px;"
        "border-bottom:1px solid #ddd;text-align:left} .pass{color:#070} .fail,.error,.crash{color:#b00}</style>"
        f"</head><body>\n<h1>llama3 harness: sweep</h1>\n<p>{html.escape(summary(records))}; "
        f"{seconds:.0f} s</p>\n"
        + "".join(f"<p>{html.escape(n)}</p>\n" for n in notes)
        + "<table><tr>"
        + "".join(f"<th>{c}</th>" for c in COLUMNS)
        + "</tr>\n"
        + "\n".join(body)
        + "\n</table></body></html>\n"
    )


def _merged_row(m: dict[str, Any]) -> list[str]:
    return [m["name"], "", f"{m['worst_ratio']:.3g}", m["first_divergence"] or "none", "-", "-"]


# ---- layer ranges merged into one whole-model comparison ------------------------------------------------------------


def merge_comparisons(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One comparison.json from those of a model's layer ranges: every name once, in forward order (names.order_key);
    a name more than one range judged (the embeddings, the logits) keeps its largest ratio; passed when every name
    passed; the first divergence and the first non-finite name are the first such in forward order."""
    by_name: dict[str, dict[str, Any]] = {}
    for part in parts:
        for r in part["results"]:
            if r["name"] not in by_name or _ratio(r["ratio"]) > _ratio(by_name[r["name"]]["ratio"]):
                by_name[r["name"]] = r
    results = sorted(by_name.values(), key=lambda r: order_key(r["name"]))
    failed = [r["name"] for r in results if not r["passed"]]
    nonfinite = [r["name"] for r in results if r.get("nonfinite")]
    union = lambda key: sorted({n for p in parts for n in p.get(key, [])} - set(by_name))  # noqa: E731
    return {
        **parts[0],
        "passed": not failed,
        "first_divergence": failed[0] if failed else None,
        "first_nonfinite": nonfinite[0] if nonfinite else None,
        "only_in_a": union("only_in_a"),
        "only_in_b": union("only_in_b"),
        "not_canonical": sorted({n for p in parts for n in p.get("not_canonical", [])}),
        "results": results,
    }


def read_comparison(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def write_merged(folder: Path, name: str, data: dict[str, Any], ranges: list[tuple[int, int]]) -> dict[str, Any]:
    from .report import write_report

    folder.mkdir(parents=True, exist_ok=True)
    data["layer_ranges"] = [list(r) for r in ranges]
    with atomic_path(folder / "comparison.json") as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    spans = ", ".join(f"{a}:{b}" for a, b in ranges)
    write_report(comparison_of(data), folder, title="llama3 harness: sweep, layer ranges merged", notes=[spans])
    worst = max(data["results"], key=lambda r: _ratio(r["ratio"]))
    return {
        "name": f"{name} (layers {spans} merged)",
        "passed": data["passed"],
        "first_divergence": data["first_divergence"],
        "worst_ratio": _ratio(worst["ratio"]),
        "worst_name": worst["name"],
        "ranges": [list(r) for r in ranges],
        "folder": str(folder.relative_to(folder.parent.parent)),
    }


def comparison_of(data: dict[str, Any]) -> Comparison:
    """A Comparison back from its JSON (what the report draws): inf and nan, written as text, made floats again."""
    known = {f.name for f in fields(NameResult)}
    numbers = lambda r: {k: float(v) if v in ("inf", "-inf", "nan") else v for k, v in r.items() if k in known}  # noqa: E731
    return Comparison(
        path_a=data["a"],
        path_b=data["b"],
        passed=data["passed"],
        first_divergence=data["first_divergence"],
        first_nonfinite=data["first_nonfinite"],
        results=[NameResult(**numbers(r)) for r in data["results"]],
        only_in_a=data["only_in_a"],
        only_in_b=data["only_in_b"],
        mode=data["mode"],
        swapped=data.get("swapped", False),
        not_canonical=data.get("not_canonical", []),
    )
