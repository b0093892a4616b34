"""Batches (`--prompts FILE`, `--padding left|right`): several prompts run as one padded batch, as code serves them,
each sequence's real positions judged against the reference run on that sequence alone, unpadded.

The batched contract: `forward(checkpoint, tokens [B, T], *, attention_mask [B, T], dtype, device)` -> logits
[B, T, V], recording canonical names with a leading batch axis ([B, T, D], a head's [B, T, hd], scores [B, T, K]). The
harness splits each recorded tensor into its sequences: `batch.{b}.NAME`, only the sequence's real positions (query
rows and key columns), so a padded position is never compared, but one that leaks into a real position fails there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import names as canon
from .errors import HarnessError

PADDINGS = ("left", "right")


def read_prompts(path: str | Path) -> list[str]:
    """`--prompts FILE`: a JSON list of strings, or one prompt per line (blank lines skipped; a line's newline is not
    part of its prompt)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HarnessError(f"{path}: prompts file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HarnessError(f"{path}: prompts file is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise HarnessError(f"{path}: not a JSON list of prompts (line {e.lineno}: {e.msg})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise HarnessError(f"{path}: a JSON prompts file must be a list of strings")
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise HarnessError(f"{path}: no prompts in the file (one per line, or a JSON list of strings)")
    return prompts


@dataclass(frozen=True)
class Batch:
    """A batch's sequences (each `[<|begin_of_text|>] + prompt`), padded to the longest on the `padding` side with
    `pad_id` (a real token id: a padded position must be masked out, not be an out-of-vocabulary id)."""

    sequences: tuple[tuple[int, ...], ...]
    padding: str = "left"
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.padding not in PADDINGS:
            raise HarnessError(f"--padding {self.padding}: expected left or right")

    @property
    def size(self) -> int:
        return len(self.sequences)

    @property
    def width(self) -> int:
        return max(map(len, self.sequences))

    def real_columns(self, sequence: int) -> range:
        """The columns of the padded prompt [0, width) that hold sequence `sequence`'s tokens."""
        n = len(self.sequences[sequence])
        return range(self.width - n, self.width) if self.padding == "left" else range(n)

    def tokens(self) -> torch.Tensor:
        """The padded prompts [B, T]."""
        padded = torch.full((self.size, self.width), self.pad_id, dtype=torch.long)  # [B, T]
        for b, ids in enumerate(self.sequences):
            padded[b, self.real_columns(b)] = torch.tensor(ids, dtype=torch.long)
        return padded

    def attention_mask(self, decoded: int = 0) -> torch.Tensor:
        """1 for a real token, 0 for a pad: [B, T + decoded] (a decoded token, appended to every sequence, is real)."""
        mask = torch.zeros((self.size, self.width + decoded), dtype=torch.long)  # [B, T + N]
        for b in range(self.size):
            mask[b, self.real_columns(b)] = 1
        mask[:, self.width :] = 1
        return mask

    def split(self, generate: int = 0):
        """The recording splitter of a batched run (harness.recording.scoped): a recorded [B, ...] tensor -> each
        sequence's real query rows (T) and key columns (K)."""
        mask = self.attention_mask(generate).bool()  # [B, T + N]

        def split(name: str, tensor: torch.Tensor, step: int | None) -> Iterator[tuple[int, torch.Tensor]]:
            if tensor.dim() == 0 or tensor.shape[0] != self.size:
                raise HarnessError(
                    f"record({name!r}): a batched run records [B, ...] with B = {self.size} sequences first; got "
                    f"shape {list(tensor.shape)}"
                )
            if name == "tokens":  # every token fed, the prompt's and (generating) the decoded ones: [B, T + N]
                yield from ((b, tensor[b][mask[b, : tensor.shape[1]]]) for b in range(self.size))
                return
            start_pos, n_new = canon.step_span(self.width, step) if step is not None else (0, self.width)
            axes = canon.axes(name if step is None else canon.step_name(step, name))
            for b in range(self.size):
                rows = torch.nonzero(mask[b, start_pos : start_pos + n_new]).flatten()  # its real new tokens
                keys = torch.nonzero(mask[b, : start_pos + n_new]).flatten()  # every real position attended
                yield b, _select(name, tensor[b], axes, {"T": rows, "K": keys}, n_new, start_pos + n_new)

        return split


def _select(name: str, x: torch.Tensor, axes, index: dict[str, torch.Tensor], n_new: int, n_keys: int) -> torch.Tensor:
    """One sequence's [T, ...] tensor -> its real positions along the T and K axes (a name not canonical: whole)."""
    if axes is None:
        return x
    sizes = {"T": n_new, "K": n_keys}
    if x.dim() != len(axes):
        raise HarnessError(f"record({name!r}): a batched run records [B, {', '.join(axes)}]; got [B, {_dims(x)}]")
    for i, axis in enumerate(axes):
        if axis in index:
            if x.shape[i] != sizes[axis]:
                raise HarnessError(
                    f"record({name!r}): axis {axis} has {x.shape[i]} positions, expected the padded {sizes[axis]}"
                )
            x = x.index_select(i, index[axis].to(x.device))
    return x


def _dims(x: torch.Tensor) -> str:
    return ", ".join(map(str, x.shape))
