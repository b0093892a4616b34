"""The report's plots, matplotlib PNGs: a layer x head heat map of error/floor per per-head name, the residual
stream's error across depth, a long prompt's error along it, and both sides' attention for the first divergent head.

For a generation, the error of each layer's output and of the logits across steps, with their floors and bounds.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import names as canon
from .bound import FLOOR_FACTOR
from .compare import Comparison, NameResult
from .errors import HarnessError
from .files import atomic_path
from .trace_file import load_trace


def measure(c: Comparison) -> str:
    return "error/floor" if c.mode != "direct" else "error/bound"


def heat_value(r: NameResult) -> float:
    """What the heat maps show: error/floor where calibrated (passes <= FLOOR_FACTOR), else error/bound (<= 1)."""
    return r.floor_ratio if r.floor_ratio is not None else r.ratio


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
    bar.set_label(f"{measure(c)} (fails above {threshold:g}; x = failed)")
    fig.suptitle(f"per-head {measure(c)}", fontsize=11)
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


# An attention map's cells per axis, at most: past it keys are summed in blocks of positions (the attention mass a
# block receives) and query rows sampled evenly. At 1,903 tokens the full map's labels overlapped and its cells were
# thinner than a pixel.
MAX_CELLS = 96


def _token_labels(c: Comparison, n: int) -> list[str]:
    """Short axis labels, one per position: the token text (a bare space as ' '), else its id."""
    labels = c.token_texts or [str(t) for t in (c.tokens or range(n))]
    return [(t.strip() and repr(t)[1:-1][:12]) or repr(t) for t in labels][:n]


def _readable(p, positions: list[int], labels: list[str]):
    """probs [R, K] (rows at `positions`) cut to at most MAX_CELLS per axis: (map, key labels, query labels, key block
    width). Keys are summed in blocks of positions, query rows sampled evenly."""
    import numpy as np

    n_keys = p.shape[1]
    width = math.ceil(n_keys / MAX_CELLS)
    keys = labels if width == 1 else [str(k) for k in range(0, n_keys, width)]  # each block's first position
    if width > 1:
        p = np.pad(p, ((0, 0), (0, -n_keys % width))).reshape(p.shape[0], -1, width).sum(-1)  # [R, K / width]
    picked = sorted(set(np.linspace(0, len(positions) - 1, min(len(positions), MAX_CELLS)).round().astype(int)))
    sampled = len(picked) < len(positions) or positions != list(range(len(positions)))
    queries = [f"{positions[i]}:{labels[positions[i]]}" if sampled else labels[positions[i]] for i in picked]
    return p[picked], keys, queries, width


def plot_attention(c: Comparison, path: Path, layer: int, head: int) -> bool:
    """A's and B's attention probabilities for one head and B - A, token labels on both axes (as the notebook's
    maps); a long prompt's keys summed in blocks of positions and its query rows sampled (`MAX_CELLS`)."""
    name = canon.head_name(layer, head, "probs")
    try:
        with load_trace(c.path_a) as a, load_trace(c.path_b) as b:
            if name not in a or name not in b:
                return False
            pa, pb = a[name].double().numpy(), b[name].double().numpy()  # [R, K]
            positions = a.rows(name) or list(range(pa.shape[0]))  # a long prompt's sampled query rows
    except HarnessError:
        return False
    labels = _token_labels(c, pa.shape[1])
    (pa, keys, queries, width), pb = _readable(pa, positions, labels), _readable(pb, positions, labels)[0]
    plt = _pyplot()
    fig, axs = plt.subplots(1, 3, figsize=(18, 6.2))
    diff = pb - pa
    lim = float(abs(diff).max()) or 1.0
    what = "probs" if width == 1 else f"probs, keys summed in blocks of {width}"
    for ax, data, title, kw in (
        (axs[0], pa, "A (reference)", dict(cmap="viridis", vmin=0, vmax=1)),
        (axs[1], pb, "B", dict(cmap="viridis", vmin=0, vmax=1)),
        (axs[2], diff, "B - A", dict(cmap="RdBu_r", vmin=-lim, vmax=lim)),
    ):
        square = width == 1 and len(queries) == len(keys)
        im = ax.imshow(data, aspect="equal" if square else "auto", interpolation="nearest", **kw)
        ax.set_title(f"{title}: layer {layer} head {head} {what}", fontsize=10)
        for set_ticks, names, rotation, most in (
            (ax.set_xticks, keys, 90, 48 if width == 1 else 12),
            (ax.set_yticks, queries, 0, 48),
        ):
            ticks = range(0, len(names), max(1, math.ceil(len(names) / most)))  # labels that do not overlap
            set_ticks(ticks, [names[i] for i in ticks], rotation=rotation, fontsize=7)
        ax.set_xlabel("key" if width == 1 else f"key position (blocks of {width})")
        ax.set_ylabel("query")
        fig.colorbar(im, ax=ax, shrink=0.7)
    _save(fig, path)
    plt.close(fig)
    return True


def plot_steps(c: Comparison, path: Path) -> bool:
    """A generation: rel_l2 of each layer's output (the residual stream) and of the logits across steps, with their
    floors (dotted) and bounds (dashed): an error above its floor but under its bound passes."""
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
        bounds = [max(r.bound, tiny) if math.isfinite(r.bound) else float("nan") for _, r in points]
        ax.plot(xs, bounds, "--", color=line.get_color(), alpha=0.6)
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
        title="error across generation steps (dotted: the reference's floor; dashed: the bound; x: failed)",
    )
    return True


# Every PNG a report may hold: a verify into a folder of a previous one removes those this one does not draw.
PNGS = ("steps.png", "heads.png", "depth.png", "positions.png", "attention.png")


def draw(c: Comparison, out: Path, *, steps: bool = False) -> list[tuple[str, str]]:
    """Every plot that applies to `c`, drawn into the folder `out`: [(file name, caption)] in the report's order.
    `steps`: a generation's error across steps first."""
    images = []
    if steps and plot_steps(c, out / "steps.png"):
        images.append(("steps.png", "Error of each layer's output and of the logits across generation steps."))
    if plot_head_heatmaps(c, out / "heads.png"):
        images.append(("heads.png", f"Per-head {measure(c)}, layer x head, for each per-head name."))
    if plot_depth(c, out / "depth.png"):
        images.append(
            ("depth.png", "Residual stream error across depth, with the reference's own floor and the bound.")
        )
    if plot_positions(c, out / "positions.png"):
        caption = "Error along the prompt: each block of positions judged against its own floor"
        images.append(("positions.png", caption + " (vertical lines: first failing positions)."))
    if (lh := divergent_head(c)) is not None and plot_attention(c, out / "attention.png", *lh):
        first = not c.passed and any(r.head is not None for r in c.failed)
        what = "first divergent head" if first else "head with the largest probs ratio"
        images.append(
            ("attention.png", f"Attention probabilities, layer {lh[0]} head {lh[1]} ({what}): A, B and B - A.")
        )
    return images
