"""`python -m harness quantization CKPT --gguf MODEL.gguf`: what a GGUF's quantization does to the model end to end, the
reference run in float32 on the checkpoint's weights and on the GGUF's dequantized ones. A report, not a verdict.

Per name: rel_l2 = |quantized - original| / |original| (each layer's attention output and output show the growth with
depth); the logits: KL(original || quantized) per position (mean, 99th percentile, max) and top-1 agreement, beside
the bands llama.cpp publishes for Llama-3-8B. Float32, because its rounding (about 6e-8 relative) is some 1e5 times
below Q8_0's weight error (about 5e-3): the differences are the quantization's alone, where bfloat16's own rounding
(about 4e-3) would be as large as Q8_0's.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .files import atomic_path
from .implementation import builtin
from .progress import quiet_transformers
from .report import STYLE
from .run import DEFAULT_PROMPT, make_run, trace
from .trace_file import load_trace

# llama.cpp's Llama-3-8B figures against its FP16 logits over the wikitext-2 test set: tools/perplexity/README.md,
# "LLaMA 2 vs. LLaMA 3 Quantization comparison" (from ggml-org/llama.cpp pull request 6936, 2024-04; also in the
# llama-cpp-python 0.3.36 sdist's vendor/llama.cpp). Mean KLD and "same top p" (top-1 agreement), as published.
BANDS = {
    "q8_0": {"mean_kld": 0.001355, "top1_agreement": 0.97674},
    "q6_K": {"mean_kld": 0.005452, "top1_agreement": 0.96031},
    "q4_K_M": {"mean_kld": 0.031273, "top1_agreement": 0.91901},
    "q2_K": {"mean_kld": 0.445132, "top1_agreement": 0.71138},
}
BANDS_SOURCE = "https://github.com/ggml-org/llama.cpp/blob/master/tools/perplexity/README.md"
# A file's general.file_type, or without one its most used tensor type -> its band.
BAND_OF_TYPE = {"MOSTLY_Q8_0": "q8_0", "MOSTLY_Q6_K": "q6_K", "MOSTLY_Q4_K_M": "q4_K_M", "MOSTLY_Q2_K": "q2_K"}
BAND_OF_TYPE |= {"Q8_0": "q8_0", "Q6_K": "q6_K", "Q4_K": "q4_K_M", "Q2_K": "q2_K"}
FILES = ("quantization.json", "quantization.html", "original.h5", "quantized.h5")


@dataclass
class QuantizationReport:
    gguf: str
    types: str  # "Q8_0 x 23, F32 x 7"
    file_type: str | None  # general.file_type: "MOSTLY_Q4_K_M" (its tensors may be other types: fallbacks)
    checkpoint: str
    prompt: str
    n_tokens: int
    depth: list[dict[str, Any]]  # per row: {"name": "embeddings" | "layer L" | "norm" | "logits", ...: rel_l2}
    names: dict[str, float]  # every recorded name's rel_l2, forward order
    kl: list[float]  # KL(original || quantized) per position, nats
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    band: str | None  # the llama.cpp band of the file's main type, if any
    reference_dtype: str = "float32"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "bands": BANDS, "bands_source": BANDS_SOURCE}

    def lines(self) -> list[str]:
        """The text section `quantization` prints."""
        rows = [f"{'':12}{'attention.output':>18}{'output':>12}"]
        for row in self.depth:
            attention = row.get("attention.output")
            rows.append(f"{row['name']:12}{'' if attention is None else f'{attention:.3g}':>18}{row['output']:>12.3g}")
        top1 = round(self.top1_agreement * self.n_tokens)
        kinds = f"{self.file_type}: {self.types}" if self.file_type else self.types
        return [
            f"quantization: {self.gguf} ({kinds}) against {self.checkpoint}'s own weights; the reference in float32 on "
            f"both, {self.n_tokens} tokens",
            "relative error |quantized - original| / |original| across depth:",
            *rows,
            f"logits: KL(original || quantized) mean {self.kl_mean:.3g}, p99 {self.kl_p99:.3g}, max {self.kl_max:.3g}"
            f" over {self.n_tokens} positions; top-1 agreement {self.top1_agreement:.0%} ({top1}/{self.n_tokens})",
            band_line(self.band),
        ]


def band_line(band: str | None) -> str:
    shown = [band] if band else list(BANDS)
    figures = "; ".join(f"{b} mean KLD {BANDS[b]['mean_kld']}, top-1 {BANDS[b]['top1_agreement']:.2%}" for b in shown)
    return (
        f"llama.cpp's published Llama-3-8B figures (its FP16 logits over wikitext-2; another model and text, a scale "
        f"to read these against, not a bound): {figures} ({BANDS_SOURCE})"
    )


def quantization_report(
    checkpoint: str | Path, gguf: str | Path, out: str | Path, *, prompt: str = DEFAULT_PROMPT, device: str = "cpu"
) -> QuantizationReport:
    """Trace the reference (float32, no oracle) on `checkpoint`'s weights and on `gguf`'s dequantized ones into `out`,
    measure the second against the first, write quantization.json and quantization.html."""
    original = make_run(checkpoint, prompt=prompt, dtype="float32", device=device)
    quantized = make_run(original.checkpoint, prompt=prompt, dtype="float32", device=device, weights_from=gguf)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reference = builtin("reference", oracle=False)
    with quiet_transformers():
        logits_o = trace(original, reference, out / "original.h5")  # [T, V]
        logits_q = trace(quantized, reference, out / "quantized.h5")  # [T, V]
    names = rel_errors(out / "original.h5", out / "quantized.h5")
    kl = kl_per_position(logits_o, logits_q)  # [T]
    kinds, file_type = quantized.checkpoint.types(), quantized.checkpoint.file_type
    report = QuantizationReport(
        gguf=str(gguf),
        types=kinds,
        checkpoint=str(original.checkpoint.path),
        prompt=prompt,
        n_tokens=len(original.tokens),
        depth=depth_rows(names, original.checkpoint.config.n_layers),
        names=names,
        kl=kl.tolist(),
        kl_mean=float(kl.mean()),
        kl_p99=float(torch.quantile(kl, 0.99)),
        kl_max=float(kl.max()),
        top1_agreement=float((logits_o.argmax(-1) == logits_q.argmax(-1)).double().mean()),
        file_type=file_type,
        band=BAND_OF_TYPE.get(file_type or kinds.split(" x ")[0]),
    )
    _write(out / "quantization.json", json.dumps(report.to_json(), indent=1) + "\n")
    _write(out / "quantization.html", _html(report))
    return report


def rel_errors(original: Path, quantized: Path) -> dict[str, float]:
    """Every name both traces hold (forward order) -> |quantized - original| / |original|, in float64."""
    errors = {}
    with load_trace(original) as a, load_trace(quantized) as b:
        for name in a.names:
            if name == "tokens" or name not in b:
                continue
            x, y = a[name].double(), b[name].double()
            errors[name] = float((y - x).norm() / x.norm()) if x.norm() > 0 else float((y - x).norm())
    return errors


def kl_per_position(original: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per position, P the original's next-token distribution, as llama-perplexity's --kl-divergence
    computes it (the base model's first): logits [T, V] -> [T] nats, in float64."""
    log_p = torch.log_softmax(original.double(), dim=-1)
    log_q = torch.log_softmax(quantized.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def depth_rows(names: dict[str, float], n_layers: int) -> list[dict[str, Any]]:
    """The growth with depth: the embeddings, each layer's attention output and output, the final norm, the logits."""
    rows = [{"name": "embeddings", "output": names["embeddings"]}]
    for layer in range(n_layers):
        rows.append(
            {
                "name": f"layer {layer}",
                "attention.output": names[f"layers.{layer}.attention.output"],
                "output": names[f"layers.{layer}.output"],
            }
        )
    return rows + [{"name": "norm", "output": names["norm"]}, {"name": "logits", "output": names["logits"]}]


def _html(report: QuantizationReport) -> str:
    def row(cells: list[Any], tag: str = "td") -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"

    depth = [row(["", "attention.output", "output"], "th")] + [
        row([r["name"], f"{r['attention.output']:.3g}" if "attention.output" in r else "", f"{r['output']:.3g}"])
        for r in report.depth
    ]
    bands = [row(["llama.cpp Llama-3-8B", "mean KLD", "top-1 agreement"], "th")] + [
        row([name, b["mean_kld"], f"{b['top1_agreement']:.2%}"]) for name, b in BANDS.items()
    ]
    lines = report.lines()
    body = [
        f"<h1>Quantization of {html.escape(Path(report.gguf).name)}</h1>",
        f"<p>{html.escape(lines[0])}</p>",
        "<h2>Relative error across depth</h2><table>" + "".join(depth) + "</table>",
        f"<h2>Logits</h2><p>{html.escape(lines[-2])}</p>",
        f'<table>{"".join(bands)}</table><p>Source: <a href="{BANDS_SOURCE}">{BANDS_SOURCE}</a> (FP16 logits over '
        "wikitext-2: another model and text; a scale to read the figures above against, not a bound).</p>",
    ]
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>quantization</title><style>{STYLE}</style></head>'
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
