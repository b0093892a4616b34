"""The HDF5 trace format: a trace written (`written`: one dataset per name, the run's metadata as file attributes, the
kept rows of a long tensor) and read back lazily (`load_trace`, `Trace`). Recording into it is harness/recording.py.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from . import names as canon
from .errors import HarnessError
from .files import atomic_path
from .names import RESERVED_PREFIX, SAMPLED_ROWS

FORMAT_VERSION = (
    2  # 2: long [T, T] tensors and logits may keep sampled rows (attribute `rows`); version 1 reads as before
)
READABLE_VERSIONS = (1, 2)
ShapeCheck = Callable[[str, tuple[int, ...]], "str | None"]


def library_versions() -> dict[str, str]:
    import h5py as _h5py

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "h5py": _h5py.__version__,
        "numpy": np.__version__,
    }
    for mod in ("transformers", "tiktoken", "harness"):
        try:  # transformers from its installed metadata: importing it costs seconds, and a golden check runs without it
            versions[mod] = metadata.version(mod) if mod == "transformers" else __import__(mod).__version__
        except (ImportError, AttributeError):  # metadata.PackageNotFoundError is an ImportError
            pass
    return versions


# Root attribute listing the metadata keys stored JSON-encoded (lists, dicts, tensors), so that reading decodes
# exactly those and a string that merely looks like JSON (a prompt "[1, 2]") stays a string. Traces written before
# it existed have no such list: their attributes are decoded by the old guess (a string starting with [ or {).
JSON_ATTRS = "json_attrs"


def _to_attr(value: Any) -> tuple[Any, bool]:
    """(value as an HDF5 attribute, whether it was JSON-encoded)."""
    if isinstance(value, (str, int, float, bool, np.integer, np.floating)):
        return value, False
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return json.dumps(value), True


def _from_attr(value: Any, encoded: bool | None) -> Any:
    """An attribute as written: decoded when it was JSON-encoded (`encoded` None: an old trace, guess as it did)."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        return value.item()
    guess = encoded is None and isinstance(value, str) and value[:1] in "[{"
    if isinstance(value, str) and (encoded or guess):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass  # not JSON after all: the string as stored
    return value


# Datasets of at least this many bytes are stored chunked and compressed (gzip level 1 after the byte shuffle: bfloat16
# values stored as float32 have 16 zero bits, and probs are zero above the diagonal). Smaller ones stay contiguous:
# a chunk index costs more than it saves on a few KiB. Measured on tiny 3.0, 183 tokens, bfloat16 verify: the
# reference trace 39 -> 27 MB, the scratch trace 14 -> 7.0 MB; verify took 51 s vs 49 s (a loaded machine: noise).
COMPRESS_MIN_BYTES = 1 << 16


# Long prompts: a [T, T] per-head tensor (scores, probs) is kept whole up to FULL_SQUARE_MAX_T tokens (4 MiB in
# float32); beyond, only SAMPLED_ROWS query rows, evenly spaced with the first and the last, are stored, with their
# positions in the dataset's `rows` attribute. At 8192 tokens one head's scores and probs would take 512 MiB (an 8B has
# 1024 heads); 64 rows take 4 MiB. Logits [T, vocab] likewise past FULL_LOGITS_MAX_ELEMENTS (64 MiB in float32; the
# last row, the next-token prediction, is always kept). Both sides of a comparison sample the same rows (a function of
# T alone), and every [T, head_dim] tensor (q, k, rotated q/k, outputs) stays whole: a position-dependent bug (RoPE)


def sampled_rows(n_rows: int) -> list[int]:
    """SAMPLED_ROWS row indices evenly spread over n_rows, the first and the last included."""
    return sorted(set(torch.linspace(0, n_rows - 1, SAMPLED_ROWS).round().long().tolist()))


def kept_rows(name: str, shape: tuple[int, ...]) -> list[int] | None:
    """The rows a trace keeps of `name` recorded with `shape` (harness/names.py's `keeps_every_row` decides), or None
    for all of them. A computation that never holds such a tensor whole computes these rows and records them as
    `Rows`."""
    return None if canon.keeps_every_row(name, shape) else sampled_rows(shape[0])


@dataclass(frozen=True)
class Rows:
    """Some rows of a tensor that was never held whole: `values` [..., len(rows), K] are the rows at positions `rows`
    (increasing, along the second-to-last axis) of a tensor with `n_rows` of them, [..., n_rows, K].

    For a long prompt computed a block of query rows at a time (the float64 oracle's attention): record
    `Rows(values, kept_rows(name, shape), n_rows)` and the trace holds exactly what recording the whole tensor would
    have (the same rows, `rows` and `full_shape` attributes); the shape check sees the whole tensor's shape.
    """

    values: torch.Tensor
    rows: Sequence[int]
    n_rows: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The whole tensor's shape."""
        return (*self.values.shape[:-2], self.n_rows, self.values.shape[-1])

    def map(self, f: Callable[[torch.Tensor], torch.Tensor]) -> Rows:
        """`f` applied to the values: a layout change of the leading axes (drop the batch, pick a head)."""
        return Rows(f(self.values), self.rows, self.n_rows)


def _select_rows(name: str, given: Rows, keep: list[int] | None) -> torch.Tensor:
    """The rows `keep` (None: every row) taken from those `given` holds; a row it lacks is an error naming it."""
    wanted = list(range(given.n_rows)) if keep is None else keep
    have = [int(r) for r in given.rows]
    if have == wanted:
        return given.values
    where = {r: i for i, r in enumerate(have)}
    if missing := [r for r in wanted if r not in where]:
        kept = "every row" if keep is None else f"{len(keep)} sampled rows"
        raise HarnessError(
            f"trace: {name!r} recorded as {len(have)} of its {given.n_rows} rows, without row {missing[0]} "
            f"({len(missing)} missing); a trace keeps {kept} of it (harness.trace_file.kept_rows)"
        )
    return given.values.index_select(-2, torch.tensor([where[r] for r in wanted], device=given.values.device))


def _storage(data: np.ndarray) -> dict[str, Any]:
    if data.nbytes < COMPRESS_MIN_BYTES:
        return {}
    return dict(chunks=True, compression="gzip", compression_opts=1, shuffle=True)


class TraceWriter:
    """A trace file being written: one dataset per name, with its attributes (`name`, `dtype`, `order`, `axes`; the
    kept `rows` and the `full_shape` of a long one)."""

    def __init__(self, file: h5py.File):
        self.file = file
        self.count = 0

    def __contains__(self, name: str) -> bool:
        return canon.to_path(name) in self.file

    def write(self, name: str, tensor: torch.Tensor | Rows, check_shape: ShapeCheck | None = None) -> None:
        """Store `tensor` (or the kept `Rows` of one) under `name`; `check_shape` sees the whole tensor's shape."""
        path = canon.to_path(name)
        if path in self.file:
            raise HarnessError(f"trace: name {name!r} recorded twice")
        given = tensor if isinstance(tensor, Rows) else None
        t = given.values.detach() if given is not None else torch.as_tensor(tensor).detach()
        shape = given.shape if given is not None else tuple(t.shape)  # the whole tensor's
        if check_shape is not None and (problem := check_shape(name, shape)):
            raise HarnessError(problem)
        if t.is_complex():
            raise HarnessError(f"trace: {name!r} is complex; record real tensors")
        rows = kept_rows(name, shape)
        if given is not None:
            t = _select_rows(name, given, rows)
        elif rows is not None:
            t = t[rows]  # before any conversion: a long [T, T] is never copied whole
        computed = str(t.dtype).removeprefix("torch.")
        if t.dtype == torch.bfloat16:
            t = t.float()  # HDF5 has no bfloat16; every bfloat16 value is exact in float32
        data = t.cpu().numpy()
        ds = self.file.create_dataset(path, data=data, **_storage(data))
        if rows is not None:
            ds.attrs["rows"] = np.asarray(rows, dtype=np.int64)  # the positions of the stored rows
            ds.attrs["full_shape"] = np.asarray(shape, dtype=np.int64)
        ds.attrs["name"] = name
        ds.attrs["dtype"] = computed
        ds.attrs["order"] = self.count
        if (axes := canon.axes(name)) is not None and len(axes) == len(shape):
            ds.attrs["axes"] = ",".join(axes)
        self.count += 1


def _checkpoint_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """`checkpoint=` an opened Checkpoint (or its directory) becomes its fingerprint, path, format and config."""
    checkpoint = metadata.get("checkpoint")
    if checkpoint is None or isinstance(checkpoint, str) and not Path(checkpoint).is_dir():
        return metadata  # absent, or already a fingerprint
    if not hasattr(checkpoint, "fingerprint"):
        from .checkpoint import open_checkpoint

        checkpoint = open_checkpoint(checkpoint)
    config = checkpoint.config
    stamped = dict(
        checkpoint=checkpoint.fingerprint(),
        checkpoint_path=str(checkpoint.path),
        checkpoint_format=checkpoint.format,
        config=config.to_dict(),
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        rope_theta=config.rope_theta,
        rope_scaling_factor=config.rope_scaling_factor or 0.0,
    )
    return {**stamped, **{k: v for k, v in metadata.items() if k != "checkpoint"}}


@contextmanager
def written(path: str | os.PathLike, metadata: dict[str, Any]) -> Iterator[TraceWriter]:
    """A trace file at `path`, its attributes the format's and `metadata`'s: it appears only when the block ends
    without error; an existing file is replaced atomically."""
    with atomic_path(path) as tmp:
        try:
            file = h5py.File(tmp, "w")
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno else str(e)  # h5py's strerror is a paragraph; errno says it
            raise HarnessError(f"{path}: cannot write in {Path(path).parent} ({reason})") from None
        with file:
            file.attrs["format_version"] = FORMAT_VERSION
            file.attrs["encoding"] = "llama3-harness-trace"
            file.attrs["library_versions"] = json.dumps(library_versions())
            encoded = ["library_versions"]  # written JSON-encoded just above
            for key, value in _checkpoint_metadata(metadata).items():
                file.attrs[key], was_json = _to_attr(value)
                encoded += [key] if was_json else []
            file.attrs[JSON_ATTRS] = json.dumps(encoded)
            yield TraceWriter(file)


def _forward_order(name: str) -> tuple:
    """Names in forward order; extras ("_oracle.NAME") after them, in their base name's forward order."""
    if name.startswith(RESERVED_PREFIX) and "." in name:
        prefix, base = name.split(".", 1)
        return (1, prefix, canon.order_key(base))
    return (0, "", canon.order_key(name))


class Trace:
    """A trace file opened for reading; tensors are read by name when asked for."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise HarnessError(f"{self.path}: trace file not found")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError:
            raise HarnessError(f"{self.path}: not a readable HDF5 trace (truncated or another format)") from None
        version = self.file.attrs.get("format_version")
        if version is None:
            self.file.close()
            raise HarnessError(f"{self.path}: not a harness trace (no format_version attribute)")
        if not isinstance(version, (int, np.integer)) or int(version) not in READABLE_VERSIONS:
            self.file.close()
            shown = int(version) if isinstance(version, (int, np.integer)) else repr(version)
            readable = " and ".join(map(str, READABLE_VERSIONS))
            raise HarnessError(f"{self.path}: trace format version {shown}, this harness reads versions {readable}")
        found: list[str] = []
        self.file.visititems(
            lambda p, obj: (
                found.append(obj.attrs.get("name", canon.from_path(p))) if isinstance(obj, h5py.Dataset) else None
            )
        )
        self._all = sorted(found, key=_forward_order)
        self.names = [n for n in self._all if not n.startswith(RESERVED_PREFIX)]

    @property
    def extra_names(self) -> list[str]:
        return [n for n in self._all if n.startswith(RESERVED_PREFIX)]

    @property
    def attrs(self) -> dict[str, Any]:
        """The file's metadata with its types: JSON-encoded ones (listed in `json_attrs`) decoded, strings as
        strings."""
        raw = dict(self.file.attrs.items())
        listed = raw.pop(JSON_ATTRS, None)
        encoded = set(json.loads(_from_attr(listed, False))) if listed is not None else None
        return {key: _from_attr(value, None if encoded is None else key in encoded) for key, value in raw.items()}

    def __contains__(self, name: str) -> bool:
        return canon.to_path(name) in self.file

    def _dataset(self, name: str) -> h5py.Dataset:
        try:
            return self.file[canon.to_path(name)]
        except KeyError:
            raise HarnessError(f"{self.path}: no tensor named {name!r} in this trace") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor as stored (bfloat16 ones come back as float32, exactly)."""
        try:
            return torch.from_numpy(self._dataset(name)[()])
        except OSError as e:
            raise HarnessError(f"{self.path}: cannot read {name!r} ({e})") from None

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the tensor as stored (a 0-d tensor whole): what a streaming reader asks for."""
        ds = self._dataset(name)
        try:
            return torch.from_numpy(ds[()] if ds.ndim == 0 else ds[start:stop])
        except OSError as e:
            raise HarnessError(f"{self.path}: cannot read {name!r} ({e})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape (sampled rows only, for a long [T, T] tensor: see `rows`)."""
        return tuple(self._dataset(name).shape)

    def rows(self, name: str) -> list[int] | None:
        """The positions of the rows stored for `name`, when only sampled rows are (long prompts); else None."""
        rows = self._dataset(name).attrs.get("rows")
        return None if rows is None else [int(r) for r in rows]

    def dtype(self, name: str) -> str:
        """The dtype the implementation computed `name` in (e.g. 'bfloat16')."""
        ds = self._dataset(name)
        return str(ds.attrs.get("dtype", ds.dtype.name))

    @property
    def tokens(self) -> list[int]:
        if "tokens" not in self:
            raise HarnessError(f"{self.path}: trace has no 'tokens'")
        return [int(t) for t in self["tokens"].tolist()]

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_trace(path: str | os.PathLike) -> Trace:
    return Trace(path)
