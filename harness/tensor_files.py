"""One tensor's bytes in a checkpoint file (`consolidated.NN.pth`, `*.safetensors`), read when asked into new memory.

Nothing stays mapped: a mapping keeps every page it touched resident, so a forward that reads one layer at a time
through one would still grow with depth (measured: docs/performance.md). Only the rows asked for are read.
"""

from __future__ import annotations

import json
import math
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import HarnessError


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only (no code from the file ever runs) and mmap (no copy in memory).

    mmap needs torch's zip format; a legacy or bare pickle is read without it, by the same weights-only unpickler.
    """
    return _torch_load(path, map_location="cpu", mmap=zipfile.is_zipfile(path))


def _torch_load(path: Path, **options) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) of a shard, its refusals and breakages as one HarnessError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it did not write; errors say enough
            sd = torch.load(path, weights_only=True, **options)
    except pickle.UnpicklingError as e:
        raise HarnessError(
            f"{path}: refused to load: the pickle asks for more than tensors ({_refusal(e)}); nothing from it was run"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError) as e:
        # torch's own messages (RuntimeError) say what broke; the unpickler's KeyError/EOFError say nothing useful
        message = str(e).strip()
        detail = message.splitlines()[0].split(". ")[0] if isinstance(e, RuntimeError) and message else type(e).__name__
        raise HarnessError(
            f"{path}: cannot read checkpoint shard: truncated or not a PyTorch file ({detail})"
        ) from None
    if not isinstance(sd, dict):
        raise HarnessError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise HarnessError(f"{path}: expected a dict of tensors, but {key!r} holds a {type(value).__name__}")
    return sd


# ---- one tensor's bytes in a file, read when asked -------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """Where a contiguous tensor's bytes lie in a file: `rows(start, stop)` reads rows of it into new memory."""

    path: Path
    offset: int  # of its first element, in bytes
    dtype: torch.dtype
    shape: tuple[int, ...]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        row = math.prod(self.shape[1:]) * self.dtype.itemsize  # bytes per row (per element of a 1-D tensor)
        with open(self.path, "rb", buffering=0) as f:
            data = _read_into(f, self.offset + start * row, (stop - start) * row, self.path)
        return data.view(self.dtype).view(stop - start, *self.shape[1:])


@dataclass(frozen=True)
class Loaded:
    """A tensor already in memory (a legacy pickle, or one whose bytes are not contiguous in its file)."""

    tensor: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop]


def _read_into(f, offset: int, n: int, path: Path) -> torch.Tensor:
    """n bytes of an open file from `offset`, as a new uint8 tensor [n] (a read returns at most ~2 GiB: looped)."""
    out = torch.empty(n, dtype=torch.uint8)
    view, done = memoryview(out.numpy()), 0
    f.seek(offset)
    while done < n:
        got = f.readinto(view[done:])
        if not got:
            raise HarnessError(f"{path}: truncated: {n - done} of a tensor's bytes missing at offset {offset + done}")
        done += got
    return out


def index_pth(path: Path) -> dict[str, Stored | Loaded]:
    """Where each tensor of a shard lies, from its pickle alone (loaded on the meta device: no data read). A legacy
    pickle, or a tensor whose bytes torch does not place (older torch, a strided view), is loaded as before."""
    if not zipfile.is_zipfile(path):
        return {name: Loaded(t) for name, t in load_pth(path).items()}
    meta = _torch_load(path, map_location="meta")
    stored = {}
    for name, t in meta.items():
        offset = getattr(t.untyped_storage(), "_checkpoint_offset", None)
        if offset is None or not t.is_contiguous():
            return {name: Loaded(t) for name, t in load_pth(path).items()}
        stored[name] = Stored(path, offset + t.storage_offset() * t.element_size(), t.dtype, tuple(t.shape))
    return stored


def _refusal(e: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only error that says what the pickle asked for (e.g. 'GLOBAL posix.system')."""
    lines = [line.strip() for line in str(e).splitlines()]
    return next(
        (line.rstrip(".") for line in lines if line.startswith(("Trying to load", "Unsupported"))), "not plain tensors"
    )


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def index_safetensors(path: Path) -> dict[str, Stored]:
    """Where each float tensor of a .safetensors file lies, from its header (8 bytes of length, then JSON): no data
    read. The file was opened by safetensors' own reader first, which refuses a corrupt or truncated one."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {
        name: Stored(path, 8 + n + entry["data_offsets"][0], _SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]))
        for name, entry in header.items()
        if name != "__metadata__" and entry["dtype"] in _SAFETENSORS_DTYPES
    }
