"""Reports people can read: the text table `compare` prints, and report.html with matplotlib PNGs for `verify`.

Plots: a layer x head heat map of error/floor per per-head name, the residual stream's error across depth, and the
attention probabilities of both sides for the first divergent head, with token labels on the axes; for a generation,
the error of each layer's output and of the logits across steps.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from . import names as canon
from .bound import FLOOR_FACTOR
from .compare import Comparison, NameResult
from .errors import HarnessError
from .files import atomic_path
from .trace_file import load_trace


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


def _measure(c: Comparison) -> str:
    return "error/floor" if c.mode != "direct" else "error/bound"


def heat_value(r: NameResult) -> float:
    """What the heat maps show: error/floor where calibrated (passes <= FLOOR_FACTOR), else error/bound (<= 1)."""
    return r.floor_ratio if r.floor_ratio is not None else r.ratio


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
        "oracle": f"calibrated on A's float64 oracle (bound = {FLOOR_FACTOR:g} x pooled floor)",
        "direct": "fixed bound against A",
        "mixed": "oracle where A has one, fixed bound elsewhere",
    }[c.mode]
    verdict = "PASS" if c.passed else "FAIL"
    return f"{verdict}: {n - bad}/{n} names within bound, {rule}; largest ratio {_fmt(worst.ratio)} at {worst.name}"


def text_report(c: Comparison, n_worst: int = 10) -> str:
    """The table `compare` prints: the worst names, logits agreement, first divergence, one summary line."""
    lines = [f"A (reference side): {c.path_a}", f"B: {c.path_b}"]
    if c.only_in_a or c.only_in_b:
        lines.append(
            f"not compared: {len(c.only_in_a)} names only in A, {len(c.only_in_b)} only in B"
            + (f" (e.g. {(c.only_in_a or c.only_in_b)[0]})")
        )
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


# ---- plots -----------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish_error_plot(
    fig, ax, c: Comparison, path: Path, *, xlabel: str, title: str, ylabel: str | None = None
) -> None:
    """A log-scale error plot's labels, legend and grid; saved and closed."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or f"relative L2 error against {'the oracle' if c.mode != 'direct' else 'A'}")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    _pyplot().close(fig)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")


def plot_head_heatmaps(c: Comparison, path: Path) -> bool:
    """One layer x head panel per per-head name, coloured by error/floor on a log scale; failing cells marked."""
    import numpy as np
    from matplotlib.colors import LogNorm

    per_head = [r for r in c.results if r.head is not None]
    if not per_head:
        return False
    n_layers = 1 + max(r.layer for r in per_head)
    n_heads = 1 + max(r.head for r in per_head)
    parts = [p for p in canon.HEAD_NAMES if any(canon.parse(r.name)[2] == p for r in per_head)]
    threshold = FLOOR_FACTOR if c.mode != "direct" else 1.0
    values = [heat_value(r) for r in per_head if math.isfinite(heat_value(r)) and heat_value(r) > 0]
    vmax = max([threshold * 3] + values)
    vmin = max(min(values + [threshold / 10]), vmax * 1e-4)
    plt = _pyplot()
    cols = min(4, len(parts))
    rows = math.ceil(len(parts) / cols)
    fig, axs = plt.subplots(
        rows, cols, figsize=(3.2 * cols + 1, (0.3 * n_layers + 2.0) * rows), squeeze=False, layout="constrained"
    )
    image = None
    for ax, part in zip(axs.flat, parts):
        grid = np.full((n_layers, n_heads), np.nan)
        for r in per_head:
            if canon.parse(r.name)[2] == part:
                v = heat_value(r)
                grid[r.layer, r.head] = min(max(v, vmin), vmax) if not math.isnan(v) else vmax
                if not r.passed:
                    ax.text(
                        r.head, r.layer, "x", ha="center", va="center", color="white", fontsize=9, fontweight="bold"
                    )
        image = ax.imshow(
            grid, cmap="viridis", norm=LogNorm(vmin=vmin, vmax=vmax), aspect="auto", interpolation="nearest"
        )
        ax.set_title(part, fontsize=10)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
    for ax in list(axs.flat)[len(parts) :]:
        ax.axis("off")
    bar = fig.colorbar(image, ax=axs, shrink=0.8)
    bar.set_label(f"{_measure(c)} (fails above {threshold:g}; x = failed)")
    fig.suptitle(f"per-head {_measure(c)}", fontsize=11)
    _save(fig, path)
    plt.close(fig)
    return True


def plot_depth(c: Comparison, path: Path) -> bool:
    """rel_l2 of the residual stream (attention_residual and output of each layer) across depth, with floor and
    bound."""
    points = []
    for r in c.results:
        layer, head, part = canon.parse(r.name)
        if layer is not None and head is None and part in ("attention_residual", "output"):
            points.append((layer + (0.5 if part == "attention_residual" else 1.0), r))
    if not points:
        return False
    points.sort(key=lambda p: p[0])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [x for x, _ in points]
    tiny = 1e-18  # log scale: an exact 0 is drawn at the bottom

    def series(values):
        return [max(v, tiny) if v is not None and math.isfinite(v) else float("nan") for v in values]

    ax.plot(xs, series([r.rel_l2 for _, r in points]), "o-", label="B: rel L2 error")
    if any(r.floor is not None for _, r in points):
        ax.plot(xs, series([r.floor for _, r in points]), "s--", label="floor: reference in its dtype vs float64")
    ax.plot(xs, series([r.bound for _, r in points]), ":", color="red", label="bound")
    for x, r in points:
        if not r.passed:
            ax.axvline(x, color="red", alpha=0.15)
    _finish_error_plot(
        fig,
        ax,
        c,
        path,
        xlabel="depth (layer + 0.5: attention_residual, layer + 1: output)",
        title="residual stream error across depth",
    )
    return True


def plot_positions(c: Comparison, path: Path) -> bool:
    """A long prompt: each block of positions' ratio to its bound along the prompt, for the first divergent name, each
    layer's output, the worst head's q_rotated and k_rotated, and the logits: where an implementation leaves the
    floor."""
    blocked = [r for r in c.results if r.blocks]
    if not blocked:
        return False
    chosen: dict[str, NameResult] = {}
    if c.first_divergence is not None and (first := c.result(c.first_divergence)).blocks:
        chosen[first.name] = first
    for r in blocked:
        layer, head, part = canon.parse(r.name)
        if (layer is not None and head is None and part == "output") or part == "logits":
            chosen.setdefault(r.name, r)
    for part in ("q_rotated", "k_rotated"):
        heads = [r for r in blocked if r.head is not None and canon.parse(r.name)[2] == part]
        if heads:
            worst = max(heads, key=lambda r: r.ratio)
            chosen.setdefault(worst.name, worst)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    tiny = 1e-6
    for i, r in enumerate(sorted(chosen.values(), key=lambda r: canon.order_key(r.name))):
        xs = [(b["positions"][0] + b["positions"][1]) / 2 for b in r.blocks]
        ys = [max(b["ratio"], tiny) if math.isfinite(b["ratio"]) else float("nan") for b in r.blocks]
        ax.plot(xs, ys, "o-", markersize=3, label=r.name, color=f"C{i % 10}")
        if r.first_failing_position is not None:
            ax.axvline(r.first_failing_position, color=f"C{i % 10}", alpha=0.3)
    ax.axhline(1.0, color="red", linestyle=":", label="bound (fails above)")
    _finish_error_plot(
        fig,
        ax,
        c,
        path,
        xlabel="position in the prompt (middle of each block)",
        title="error along the prompt: each block of positions' ratio to its bound",
        ylabel="ratio",
    )
    return True


def divergent_head(c: Comparison) -> tuple[int, int] | None:
    """(layer, head) to draw: the first failing per-head name's, else the worst `probs` by ratio."""
    heads = [r for r in c.results if r.head is not None]
    failing = [r for r in heads if not r.passed]
    if failing:
        return failing[0].layer, failing[0].head
    probs = [r for r in heads if canon.parse(r.name)[2] == "probs"]
    if not probs:
        return None
    worst = max(probs, key=lambda r: r.ratio)
    return worst.layer, worst.head


def plot_attention(c: Comparison, path: Path, layer: int, head: int) -> bool:
    """A's and B's attention probabilities for one head and B - A, token labels on both axes (as the notebook's
    maps)."""
    name = canon.head_name(layer, head, "probs")
    try:
        with load_trace(c.path_a) as a, load_trace(c.path_b) as b:
            if name not in a or name not in b:
                return False
            pa, pb = a[name].double().numpy(), b[name].double().numpy()
            rows = a.rows(name)  # a long prompt's sampled query rows
    except HarnessError:
        return False
    labels = c.token_texts or [str(t) for t in (c.tokens or range(pa.shape[1]))]
    keys = [(t.strip() and repr(t)[1:-1][:12]) or repr(t) for t in labels][: pa.shape[1]]  # a bare space shows as ' '
    queries = [f"{r}:{keys[r]}" for r in rows] if rows is not None else keys[: pa.shape[0]]
    plt = _pyplot()
    fig, axs = plt.subplots(1, 3, figsize=(18, 6.2))
    diff = pb - pa
    lim = float(abs(diff).max()) or 1.0
    for ax, data, title, kw in (
        (axs[0], pa, "A (reference)", dict(cmap="viridis", vmin=0, vmax=1)),
        (axs[1], pb, "B", dict(cmap="viridis", vmin=0, vmax=1)),
        (axs[2], diff, "B - A", dict(cmap="RdBu_r", vmin=-lim, vmax=lim)),
    ):
        im = ax.imshow(data, aspect="auto" if rows is not None else "equal", interpolation="nearest", **kw)
        ax.set_title(f"{title}: layer {layer} head {head} probs", fontsize=10)
        for set_ticks, names, rotation in ((ax.set_xticks, keys, 90), (ax.set_yticks, queries, 0)):
            ticks = range(0, len(names), max(1, len(names) // 48))  # at most ~48 labels per axis
            set_ticks(ticks, [names[i] for i in ticks], rotation=rotation, fontsize=7)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        fig.colorbar(im, ax=ax, shrink=0.7)
    _save(fig, path)
    plt.close(fig)
    return True


def plot_steps(c: Comparison, path: Path) -> bool:
    """A generation: rel_l2 of each layer's output (the residual stream) and of the logits across steps, with floors."""
    series: dict[str, list[tuple[int, NameResult]]] = {}
    for r in c.results:
        step, base = canon.split_step(r.name)
        layer, head, part = canon.parse(base)
        if step is not None and ((layer is not None and head is None and part == "output") or base == "logits"):
            series.setdefault(base, []).append((step, r))
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    tiny = 1e-18
    for i, (base, points) in enumerate(sorted(series.items(), key=lambda kv: canon.order_key(kv[0]))):
        xs = [s for s, _ in points]
        line = ax.plot(xs, [max(r.rel_l2, tiny) for _, r in points], "o-", label=f"{base}", color=f"C{i}")[0]
        if any(r.floor is not None for _, r in points):
            ax.plot(xs, [max(r.floor or tiny, tiny) for _, r in points], ":", color=line.get_color())
        for x, r in points:
            if not r.passed:
                ax.plot([x], [max(r.rel_l2, tiny)], "x", color="red", markersize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    _finish_error_plot(
        fig,
        ax,
        c,
        path,
        xlabel="step (0: prefill of the prompt; s: decode step s, one token)",
        title="error across generation steps (dotted: the reference's floor; x: failed)",
    )
    return True


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
    images = []
    if steps and plot_steps(c, out / "steps.png"):
        images.append(("steps.png", "Error of each layer's output and of the logits across generation steps."))
    if plot_head_heatmaps(c, out / "heads.png"):
        images.append(("heads.png", f"Per-head {_measure(c)}, layer x head, for each per-head name."))
    if plot_depth(c, out / "depth.png"):
        images.append(
            ("depth.png", "Residual stream error across depth, with the reference's own floor and the bound.")
        )
    if plot_positions(c, out / "positions.png"):
        images.append(
            (
                "positions.png",
                "Error along the prompt: each block of positions judged against its own floor "
                "(vertical lines: first failing positions).",
            )
        )
    if (lh := divergent_head(c)) is not None and plot_attention(c, out / "attention.png", *lh):
        what = (
            "first divergent head"
            if not c.passed and any(r.head is not None for r in c.failed)
            else "head with the largest probs ratio"
        )
        images.append(
            ("attention.png", f"Attention probabilities, layer {lh[0]} head {lh[1]} ({what}): A, B and B - A.")
        )
    table = "\n".join(_row(r) for r in sorted(c.results, key=lambda r: -r.ratio)[:40])
    verdict = "PASS" if c.passed else "FAIL"
    body = [
        f'<h1>{html.escape(title)}: <span class="{verdict.lower()}">{verdict}</span></h1>',
        f"<p>{html.escape(summary_line(c))}</p>",
        f"<p><b>{html.escape(describe_divergence(c))}</b></p>",
        *(f"<p>{html.escape(n)}</p>" for n in notes),
        f"<p>A: <code>{html.escape(c.path_a)}</code><br>B: <code>{html.escape(c.path_b)}</code></p>",
    ]
    if c.only_in_a or c.only_in_b:
        body.append(f"<p>Not compared: {len(c.only_in_a)} names only in A, {len(c.only_in_b)} only in B.</p>")
    if steps:
        body.append(_step_table(steps))
    for png, caption in images:
        body.append(
            f'<figure><img src="{png}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    body.append(
        "<h2>Worst names</h2><table><tr><th>name</th><th>rel L2</th><th>floor</th><th>bound</th><th>ratio</th>"
        "<th>cosine</th><th>max abs</th><th>worst</th><th>non-finite</th></tr>" + table + "</table>"
    )
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto} img{max-width:100%} td,th{padding:2px 8px;"
        "font-size:13px;text-align:right} td:first-child{text-align:left} tr.fail{background:#fdd} .pass{color:green}"
        " .fail{color:#b00} figure{margin:1.5em 0}"
    )
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
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
        f"{result.implementation} {result.implementation_text!r}"
    ]
