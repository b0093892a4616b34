"""`verify`: trace the Hugging Face reference (with its float64 oracle) and the from-scratch forward, compare, report.

Isolated mode feeds each scratch layer the reference's input to it, so a bug is found in its own layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import open_checkpoint
from .compare import Comparison, compare_traces, write_json
from .errors import HarnessError
from .report import write_report
from .runner import DEFAULT_PROMPT, check_device, parse_dtype, token_text, trace_scratch
from .tracing import Trace, load_trace


@dataclass
class VerifyResult:
    comparison: Comparison
    out: Path
    reference_token: int
    scratch_token: int
    reference_text: str
    scratch_text: str

    @property
    def passed(self) -> bool:
        return self.comparison.passed


def reference_layer_input(reference: Trace):
    """`layer_input(l)` for isolated mode: `embeddings` into layer 0, `layers.{l-1}.output` after (l = n_layers: final norm)."""

    def layer_input(layer: int) -> torch.Tensor:
        return reference["embeddings"] if layer == 0 else reference[f"layers.{layer - 1}.output"]

    return layer_input


def verify(checkpoint: str | Path, *, out: str | Path = "verify-out", dtype: str = "float32", prompt: str = DEFAULT_PROMPT,
           isolated: bool = False, device: str = "cpu", progress: bool = False) -> VerifyResult:
    """Trace both implementations into `out` (reference.h5, scratch.h5), compare, write comparison.json and report.html."""
    from .reference import trace_reference

    parse_dtype(dtype)
    check_device(device)
    out = Path(out)
    if not out.parent.is_dir():
        raise HarnessError(f"{out}: parent folder {out.parent} does not exist")
    if out.exists() and not out.is_dir():
        raise HarnessError(f"{out}: exists and is not a folder")
    ckpt = open_checkpoint(checkpoint)
    out.mkdir(exist_ok=True)
    ref_path, scratch_path = out / "reference.h5", out / "scratch.h5"
    ref_logits = trace_reference(ckpt, ref_path, prompt=prompt, dtype=dtype, device=device, progress=progress, oracle=True)
    with load_trace(ref_path) as reference:
        layer_input = reference_layer_input(reference) if isolated else None
        scratch_logits = trace_scratch(ckpt, scratch_path, prompt=prompt, dtype=dtype, device=device, progress=progress,
                                       layer_input=layer_input, isolated=isolated)  # fmt: skip

    text = token_text(ckpt)  # the tokenizer, loaded once for every token shown
    comparison = compare_traces(ref_path, scratch_path, token_text=text)
    write_json(comparison, out / "comparison.json")
    ref_token, scratch_token = int(ref_logits[-1].float().argmax()), int(scratch_logits[-1].float().argmax())
    notes = [f"checkpoint {ckpt.path}, dtype {dtype}, {'isolated layers' if isolated else 'end to end'}; prompt {prompt!r}",
             f"next token: reference {text(ref_token)!r} (id {ref_token}), scratch {text(scratch_token)!r} (id {scratch_token})"]  # fmt: skip
    write_report(comparison, out, notes=notes)
    return VerifyResult(comparison, out, ref_token, scratch_token, text(ref_token), text(scratch_token))
