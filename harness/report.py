"""Reports people can read: the text table `compare` prints (with its warnings), the lines `verify` adds (how it ran,
near ties, `--generate`'s steps), and report.html around the plots (harness/plots.py) for `verify`.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from .bound import ABS_TERM_ULPS, FLOOR_FACTOR, UNIT_ROUNDOFF
from .compare import Comparison, NameResult
from .errors import HarnessError
from .files import atomic_path
from .names import ORACLE_PREFIX
from .plots import PNGS, divergent_head, draw, heat_value, plot_positions

REPORT_FILES = ("report.html", *PNGS)  # what write_report may write into its folder


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


def _where(r: NameResult) -> str:
    if r.worst_position is None:
        return ""
    text = f"pos {r.worst_position}"
    return text + (f" {r.worst_token!r}" if r.worst_token is not None else "")


def describe_divergence(c: Comparison) -> str:
    if c.first_divergence is None:
        return "first divergence: none"
    r = c.result(c.first_divergence)
    head = f" (layer {r.layer}, head {r.head})" if r.head is not None else ""
    if r.nonfinite:
        return f"first divergence: {r.name}{head}: non-finite values first appear at {c.first_nonfinite}: {r.nonfinite}"
    floor = f", floor {_fmt(r.floor)}" if r.floor is not None else ""
    if r.blocks and r.first_failing_position is not None:  # a long prompt: where along it the name fails
        worst = max(r.blocks, key=lambda b: b["ratio"])
        at = r.first_failing_position
        token = f" {c.token_texts[at]!r}" if c.token_texts and at < len(c.token_texts) else ""
        block_floor = f", floor {_fmt(worst['floor'])}" if worst["floor"] is not None else ""
        return (
            f"first divergence: {r.name}{head}: first failing at position {at}{token}; worst at positions "
            f"{worst['positions'][0]}-{worst['positions'][1]}, {_fmt(worst['ratio'])}x their bound (rel_l2 "
            f"{_fmt(worst['rel_l2'])}{block_floor}); over the whole prompt rel_l2 {_fmt(r.rel_l2)}, "
            f"bound {_fmt(r.bound)}"
        )
    return (
        f"first divergence: {r.name}{head}: rel_l2 {_fmt(r.rel_l2)} > bound {_fmt(r.bound)} ({_fmt(r.ratio)}x the bound"
        f"{floor}), cosine {r.cosine:.4f}, worst at {_where(r) or '-'}"
    )


def summary_line(c: Comparison) -> str:
    n, bad = len(c.results), len(c.failed)
    worst = max(c.results, key=lambda r: r.ratio)
    rule = {
        "oracle": f"calibrated on A's float64 oracle (bound = {FLOOR_FACTOR:g} x (pooled floor + "
        f"{ABS_TERM_ULPS:g} u) x small-sample tail, u the dtype's unit roundoff)",
        "direct": "fixed bound against A",
        "mixed": "oracle where A has one, fixed bound elsewhere",
    }[c.mode]
    verdict = "PASS" if c.passed else "FAIL"
    return f"{verdict}: {n - bad}/{n} names within bound, {rule}; largest ratio {_fmt(worst.ratio)} at {worst.name}"


def caveats(c: Comparison) -> list[str]:
    """What the table's head says besides the paths: names not compared, names not canonical, a B of another dtype."""
    lines = []
    if c.only_in_a or c.only_in_b:
        lines.append(
            f"not compared: {len(c.only_in_a)} names only in A, {len(c.only_in_b)} only in B"
            + (f" (e.g. {(c.only_in_a or c.only_in_b)[0]})")
        )
    if c.not_canonical:
        shown = ", ".join(c.not_canonical[:5]) + (
            f" and {len(c.not_canonical) - 5} more" if len(c.not_canonical) > 5 else ""
        )
        lines.append(
            f"warning: {len(c.not_canonical)} names are not canonical (misspelled? README: Canonical names): {shown}"
        )
    da, db = c.attrs_a.get("dtype"), c.attrs_b.get("dtype")
    if c.mode != "direct" and da in UNIT_ROUNDOFF and db in UNIT_ROUNDOFF and UNIT_ROUNDOFF[db] < UNIT_ROUNDOFF[da]:
        lines.append(
            f"note: B ran in {db}, A in {da}: B is held to A's {da} rounding, so a bug smaller than that passes; "
            f"trace the reference in {db} to see it"
        )
    return lines


def text_report(c: Comparison, n_worst: int = 10) -> str:
    """The table `compare` prints: warnings, the worst names, logits agreement, first divergence, one summary line."""
    lines = [f"A (reference side): {c.path_a}", f"B: {c.path_b}", *caveats(c)]
    header = f"{'name':<44} {'rel_l2':>9} {'floor':>9} {'bound':>9} {'ratio':>7}  {'cosine':>8}  worst"
    lines += [
        "",
        f"worst {min(n_worst, len(c.results))} names "
        "(ratio = rel_l2 / bound, or its worst block's on a long prompt; > 1 fails):",
        header,
    ]
    for r in sorted(c.results, key=lambda r: -r.ratio)[:n_worst]:
        mark = " " if r.passed else "!"
        lines.append(
            f"{r.name:<44} {_fmt(r.rel_l2):>9} {_fmt(r.floor):>9} {_fmt(r.bound):>9} {_fmt(r.ratio):>7}{mark} "
            f"{r.cosine:>8.5f}  {_where(r)}"
        )
    if (logits := c.result("logits")) is not None and logits.logits:
        m = logits.logits
        lines += [
            "",
            f"logits: top-1 agreement {m['top1_rate']:.0%} ({sum(m['top1'])}/{len(m['top1'])} positions), "
            f"top-5 overlap {m['top5_rate']:.0%}, KL(A||B) mean {m['kl_mean']:.3g} max {m['kl_max']:.3g}",
        ]
    lines += ["", describe_divergence(c), summary_line(c)]
    return "\n".join(lines)


def _step_table(steps: list[dict]) -> str:
    fail = ' class="fail"'
    rows = "".join(
        f"<tr{'' if s['first_divergence'] is None else fail}><td>{s['step']}</td><td>{s['passed']}/{s['names']}</td>"
        f"<td>{html.escape(s['first_divergence'] or '-')}</td><td>{html.escape(s['worst'] or '-')}</td>"
        f"<td>{_fmt(s['worst_ratio'])}</td></tr>"
        for s in steps
    )
    return (
        "<h2>Per step</h2><table><tr><th>step</th><th>passed</th><th>first divergence</th><th>worst name</th>"
        "<th>ratio</th></tr>" + rows + "</table>"
    )


# ---- HTML ------------------------------------------------------------------------------------------------------------


def _row(r: NameResult) -> str:
    cls = "" if r.passed else ' class="fail"'
    cells = [
        r.name,
        _fmt(r.rel_l2),
        _fmt(r.floor),
        _fmt(r.bound),
        _fmt(r.ratio),
        f"{r.cosine:.5f}",
        _fmt(r.max_abs),
        _where(r),
        r.nonfinite or "",
    ]
    return f"<tr{cls}>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells) + "</tr>"


STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto} img{max-width:100%} td,th{padding:2px 8px;"
    "font-size:13px;text-align:right} td:first-child{text-align:left} tr.fail{background:#fdd} .pass{color:green}"
    " .fail{color:#b00} figure{margin:1.5em 0}"
)


def write_report(
    c: Comparison,
    out: str | Path,
    *,
    title: str = "llama3 harness: verify",
    notes: list[str] = (),
    steps: list[dict] | None = None,
) -> Path:
    """report.html and its PNGs into the folder `out` (which must exist); returns the HTML's path. `steps`: a
    generation's per-step summaries (harness/generation.py `step_summary`), drawn across steps and tabled."""
    out = Path(out)
    if not out.is_dir():
        raise HarnessError(f"{out}: report folder does not exist")
    images = draw(c, out, steps=bool(steps))
    verdict = "PASS" if c.passed else "FAIL"
    body = [
        f'<h1>{html.escape(title)}: <span class="{verdict.lower()}">{verdict}</span></h1>',
        f"<p>{html.escape(summary_line(c))}</p>",
        f"<p><b>{html.escape(describe_divergence(c))}</b></p>",
        *(f"<p>{html.escape(n)}</p>" for n in [*notes, *caveats(c)]),
        f"<p>A: <code>{html.escape(c.path_a)}</code><br>B: <code>{html.escape(c.path_b)}</code></p>",
        _step_table(steps) if steps else "",
        *(
            f'<figure><img src="{png}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption>'
            "</figure>"
            for png, caption in images
        ),
        "<h2>Worst names</h2><table><tr><th>name</th><th>rel L2</th><th>floor</th><th>bound</th><th>ratio</th>"
        "<th>cosine</th><th>max abs</th><th>worst</th><th>non-finite</th></tr>"
        + "\n".join(_row(r) for r in sorted(c.results, key=lambda r: -r.ratio)[:40])
        + "</table>",
    ]
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(filter(None, body)) + "\n</body></html>\n"
    )
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def generation_lines(result) -> list[str]:
    """What `verify --generate` prints after the table: per step, the cache check, each side's generated text."""
    lines = ["", "per step (0: prefill):"]
    for s in result.steps:
        verdict = "ok  " if s["first_divergence"] is None else "FAIL"
        lines.append(
            f"  step {s['step']:>3} {verdict} {s['passed']}/{s['names']} names"
            + (
                f", first divergence {s['first_divergence']}"
                if s["first_divergence"]
                else f", worst ratio {_fmt(s['worst_ratio'])}"
            )
        )
    bad = [r for r in result.cache_check if not r.passed]
    lines.append(
        f"cache against no cache: {len(result.cache_check) - len(bad)}/{len(result.cache_check)} names agree"
        + (f"; first disagreement {bad[0].name} (rel_l2 {_fmt(bad[0].rel_l2)} > {_fmt(bad[0].bound)})" if bad else "")
    )
    return lines + [
        f"generated (greedy, each side from the same teacher-forced inputs): reference {result.reference_text!r}, "
        f"{result.implementation} {result.implementation_text!r}",
        *greedy_differences(result),
    ]


def greedy_differences(result) -> list[str]:
    """Why the two sides' greedy tokens differ, where they do: a near tie (the float64 oracle puts the two tokens
    closer than the two sides' logit errors: rounding, not a bug), or beyond rounding (harness/generation.py
    `unexplained_disagreements`)."""
    ref, impl = getattr(result, "reference_generated", []), getattr(result, "implementation_generated", [])
    unexplained = getattr(result, "unexplained", [])
    differ = [s for s, (a, b) in enumerate(zip(ref, impl)) if a != b]
    near = [s for s in differ if not any(u.startswith(f"step {s}:") for u in unexplained)]
    lines = []
    if near:
        lines.append(
            f"greedy tokens differ at step {', '.join(map(str, near))}: near ties (the float64 oracle puts the two "
            "tokens closer than the two sides' logit errors): rounding, not a divergence"
        )
        for s in near:
            tie = greedy_tie(result, f"steps.{s}.logits", ref[s], impl[s])
            lines += [f"  step {s}: {tie}"] if tie else []
    return lines + [f"greedy tokens differ beyond rounding at {u}" for u in unexplained]


def greedy_tie(result, name: str, a: int, b: int) -> str | None:
    """Why the reference's greedy token `a` and the implementation's `b` differ at the last row of `name`: each side's
    logits of both, and the float64 oracle's margin between them against the two sides' largest logit errors there
    (harness/generation.py's rule: within the errors, a near tie). None when the traces do not hold them."""
    from .trace_file import load_trace

    try:
        with load_trace(Path(result.out) / "reference.h5") as ref, load_trace(result.trace_path) as impl:
            if name not in impl or ORACLE_PREFIX + name not in ref:
                return None
            r, i, o = (t[n][-1].double() for t, n in ((ref, name), (impl, name), (ref, ORACLE_PREFIX + name)))  # [V]
    except (HarnessError, OSError, AttributeError):
        return None
    from .generation import greedy_tie as tie_of

    tie = tie_of(r, i, o, a, b)
    near, gap, err = tie.near, tie.gap, tie.err
    return (
        f"logits of {a} (the reference's) and {b} ({result.implementation}'s): reference {float(r[a]):.4g} and "
        f"{float(r[b]):.4g}, {result.implementation} {float(i[a]):.4g} and {float(i[b]):.4g}; the float64 oracle puts "
        f"them {gap:.3g} apart ({float(o[a]):.4g} and {float(o[b]):.4g}), {'within' if near else 'more than'} the two "
        f"sides' logit errors ({err:.3g}): " + ("a near tie, rounding" if near else "beyond rounding")
    )


def next_token_lines(result) -> list[str]:
    """What `verify` prints after the next token of one forward pass when the two sides' differ: why (`greedy_tie`)."""
    a, b = result.reference_token, result.implementation_token
    if a == b:
        return []
    tie = greedy_tie(result, "logits", a, b)
    return [f"next tokens differ: {tie}"] if tie else []


def run_mode(*, isolated: bool, vectorized: bool, generate: int, implementation: str) -> str:
    """How `verify` ran, one line: end to end or isolated layers, attention per head or batched, one forward pass or
    a generation."""
    layers = (
        f"isolated layers (each layer of {implementation} fed the reference's input to it)"
        if isolated
        else "end to end (each layer fed its own previous layer's output)"
    )
    attention = ", attention batched (every head at once, --vectorized)" if vectorized else ""
    passes = (
        f"a prefill and {generate} decode steps with the KV cache, each side fed the reference's greedy tokens, and "
        f"{implementation}'s no-cache forward over the same tokens"
        if generate
        else "one forward pass over the prompt"
    )
    return f"run: {layers}{attention}; {passes}"


__all__ = [
    "REPORT_FILES",
    "describe_divergence",
    "divergent_head",
    "generation_lines",
    "greedy_tie",
    "next_token_lines",
    "run_mode",
    "heat_value",
    "plot_positions",
    "summary_line",
    "text_report",
    "caveats",
    "write_report",
]
