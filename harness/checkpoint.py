"""Read a Meta or Hugging Face Llama-3 checkpoint directory: one config, and tensors in Meta's layout one at a time.

Meta: params.json + consolidated.NN.pth (model-parallel shards merged on each tensor's split dim) + tokenizer.model.
HF: config.json + model.safetensors (or sharded with model.safetensors.index.json). Nothing runs code from a file.
Tensors are read from the files when asked, into new memory, never mapped: a mapping keeps every page it touched
resident, so a forward reading one layer at a time through one would grow with depth (docs/any-size.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import hf_layout
from .config import ModelConfig, config_from_hf_json, config_from_params_json
from .errors import HarnessError
from .tensor_files import Loaded, Stored, index_pth, index_safetensors
from .tensor_files import load_pth as load_pth  # where the tests and tools have always imported it from

# Model-parallel split dimension of each Meta tensor (None: replicated in every shard).
_SPLIT_DIM = {
    "tok_embeddings": 0,
    "output": 0,
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "wo": 1,
    "w2": 1,
    "attention_norm": None,
    "ffn_norm": None,
    "norm": None,
}
_IGNORED = {"rope.freqs"}  # present in Llama 2 checkpoints; Llama 3 recomputes it


def split_dim(name: str) -> int | None:
    return _SPLIT_DIM[name.removesuffix(".weight").split(".")[-1]]


def meta_names(config: ModelConfig) -> list[str]:
    """Every tensor a Meta checkpoint of this config holds, in load order."""
    names = ["tok_embeddings.weight"]
    for i in range(config.n_layers):
        names += [f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        names += [f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
        names += [f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"]
    return names + ["norm.weight", "output.weight"]


def expected_shape(config: ModelConfig, name: str) -> tuple[int, ...]:
    c, hd = config, config.head_dim
    part = name.removesuffix(".weight").split(".")[-1]
    return {
        "tok_embeddings": (c.vocab_size, c.dim),
        "output": (c.vocab_size, c.dim),
        "wq": (c.n_heads * hd, c.dim),
        "wk": (c.n_kv_heads * hd, c.dim),
        "wv": (c.n_kv_heads * hd, c.dim),
        "wo": (c.dim, c.n_heads * hd),
        "w1": (c.ffn_dim, c.dim),
        "w3": (c.ffn_dim, c.dim),
        "w2": (c.dim, c.ffn_dim),
        "attention_norm": (c.dim,),
        "ffn_norm": (c.dim,),
        "norm": (c.dim,),
    }[part]


@dataclass
class Checkpoint:
    """A checkpoint directory opened for reading; `tensor(name)` gives Meta's name and layout, read when asked.

    Every read is new memory the caller holds and frees (harness/tensor_files.py): `tensor` a whole tensor, `rows` a
    block of its rows, `take` the rows at some ids (an embedding lookup).
    """

    path: Path
    format: str  # "meta" or "hf"
    config: ModelConfig
    tokenizer_path: Path | None
    _shards: list[dict[str, Stored | Loaded]] = field(default_factory=list, repr=False)
    _hf_files: dict[str, Path] = field(default_factory=dict, repr=False)
    _hf_index: dict[str, Stored] = field(default_factory=dict, repr=False)

    # -- tensors ---------------------------------------------------------
    def names(self) -> list[str]:
        return meta_names(self.config)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of `name` (merged across shards), read without loading the data."""
        if self.format == "hf":
            return self._hf_index[self._hf_name(name)].shape
        shapes = [s[name].shape for s in self._shards]
        dim = split_dim(name)
        if dim is None or len(shapes) == 1:
            return shapes[0]
        merged = list(shapes[0])
        merged[dim] = sum(s[dim] for s in shapes)
        return tuple(merged)

    def dtype(self, name: str) -> str:
        """The stored dtype of `name` ('bfloat16', ...), read without loading the data."""
        stored = self._hf_index[self._hf_name(name)] if self.format == "hf" else self._shards[0][name]
        return str(stored.dtype).removeprefix("torch.")

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor in Meta's layout, read from the file(s) now."""
        return self.rows(name, 0, self._checked(name)[0])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start` .. `stop - 1` of a tensor in Meta's layout (a chunk of the vocabulary, a block of a projection's
        output features), read now: only those rows' bytes. q/k of an HF checkpoint in whole heads (head_dim rows)."""
        n_rows = self._checked(name)[0]
        if not 0 <= start <= stop <= n_rows:
            raise HarnessError(f"{self.path}: rows {start}:{stop} of {name}, which has {n_rows}")
        if self.format == "meta":
            return _merged_rows([s[name] for s in self._shards], split_dim(name), start, stop)
        t = self._hf_index[self._hf_name(name)].rows(start, stop)
        if hf_layout.heads_of(name):
            hd = self.config.head_dim
            if start % hd or stop % hd:
                raise HarnessError(f"{self.path}: rows {start}:{stop} of {name} split a head ({hd} rows each)")
            t = hf_layout.permute_to_meta(t, (stop - start) // hd)
        return t

    def take(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """The rows at `ids` [T] (an embedding lookup): [T, D], reading those rows only."""
        n_rows = self._checked(name)[0]
        unique, where = torch.unique(
            torch.as_tensor(ids, dtype=torch.long).flatten().cpu(), return_inverse=True
        )  # sorted
        if len(unique) and not 0 <= int(unique[0]) <= int(unique[-1]) < n_rows:
            raise HarnessError(f"{self.path}: token ids {unique[0]}..{unique[-1]} outside {name}'s {n_rows} rows")
        return torch.cat([self.rows(name, i, i + 1) for i in unique.tolist()])[where]

    def _checked(self, name: str) -> tuple[int, ...]:
        if name not in set(self.names()):
            raise HarnessError(f"{self.path}: no tensor {name!r} in a Llama-3 checkpoint")
        return self.shape(name)

    def _hf_name(self, name: str) -> str:
        hf = hf_layout.meta_to_hf_name(name)
        if name == "output.weight" and hf not in self._hf_files:
            return "model.embed_tokens.weight"  # tied embeddings
        return hf

    def fingerprint(self) -> str:
        """sha256 over the model-defining config fields, every tensor's name/shape/dtype, and the norm weights' bytes.

        The same weights in Meta or HF layout give the same fingerprint.
        """
        c = self.config
        fields = dict(
            dim=c.dim,
            n_layers=c.n_layers,
            n_heads=c.n_heads,
            n_kv_heads=c.n_kv_heads,
            vocab_size=c.vocab_size,
            ffn_dim=c.ffn_dim,
            norm_eps=c.norm_eps,
            rope_theta=c.rope_theta,
            head_dim=c.head_dim,
            rope_scaling=c.to_dict()["rope_scaling"],
            tie_word_embeddings=c.tie_word_embeddings,
        )
        h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
        for name in self.names():
            h.update(f"{name}{self.shape(name)}{self.dtype(name)}".encode())
            if name.endswith("norm.weight"):
                h.update(self.tensor(name).float().numpy().tobytes())
        return h.hexdigest()

    def validate(self) -> None:
        """Every tensor present with the shape the config implies; the message names the tensor and both shapes."""
        for name in self.names():
            got, want = self.shape(name), expected_shape(self.config, name)
            if got != want:
                raise HarnessError(f"{self.path}: tensor {name} has shape {list(got)}, config implies {list(want)}")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a Meta (params.json) or HF (config.json) checkpoint directory and check its tensors against its config.

    `~` is expanded, as a shell would (a quoted '~/Meta-Llama-3-8B' or `--llama3-checkpoint=~/...` reaches us as is)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise HarnessError(f"{path}: checkpoint directory not found")
    if (path / "params.json").exists():
        ckpt = _open_meta(path)
    elif (path / "config.json").exists():
        ckpt = _open_hf(path)
    else:
        raise HarnessError(f"{path}: neither params.json (Meta) nor config.json (Hugging Face) found")
    ckpt.validate()
    return ckpt


def _open_meta(path: Path) -> Checkpoint:
    shard_files = sorted(path.glob("consolidated.*.pth"))
    if not shard_files:
        raise HarnessError(f"{path}: no consolidated.NN.pth shard found beside params.json")
    numbers = [int(m[1]) if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", f.name)) else -1 for f in shard_files]
    if numbers != list(range(len(shard_files))):
        raise HarnessError(
            f"{path}: shards must be numbered consolidated.00.pth .. {len(shard_files) - 1:02d}, "
            f"found {[f.name for f in shard_files]}"
        )
    shards = [index_pth(f) for f in shard_files]  # where each tensor lies; no data read
    keys = set(shards[0]) - _IGNORED
    for f, s in zip(shard_files[1:], shards[1:]):
        if set(s) - _IGNORED != keys:
            diff = sorted((set(s) - _IGNORED) ^ keys)[:3]
            raise HarnessError(
                f"{f}: shards do not fit together: tensor names differ from {shard_files[0].name} ({diff})"
            )
    config = config_from_params_json(path / "params.json")
    known = set(meta_names(config))
    for name in sorted(keys):
        if name not in known:
            raise HarnessError(
                f"{shard_files[0]}: unexpected tensor {name!r} for the n_layers={config.n_layers} in params.json"
            )
        dim = split_dim(name)
        shapes = [tuple(s[name].shape) for s in shards]
        others = [tuple(d for i, d in enumerate(sh) if i != dim) for sh in shapes]
        if len(set(others)) > 1 or (dim is None and len(set(shapes)) > 1):
            raise HarnessError(f"{path}: shards do not fit together: {name} has shapes {[list(s) for s in shapes]}")
        if dim is None and not all(_same(shards[0][name], s[name]) for s in shards[1:]):
            # Meta replicates the norms in every shard; different values mean shards of different checkpoints
            raise HarnessError(f"{path}: shards do not fit together: replicated tensor {name} differs between shards")
    if "output.weight" in keys:
        out, emb = shards[0]["output.weight"], shards[0]["tok_embeddings.weight"]
        tied = out.shape == emb.shape and all(_same(s["output.weight"], s["tok_embeddings.weight"]) for s in shards)
    else:
        tied = True
    config = dataclasses.replace(config, tie_word_embeddings=tied)
    missing = [n for n in meta_names(config) if n not in keys and not (n == "output.weight" and tied)]
    if missing:
        raise HarnessError(
            f"{shard_files[0]}: required tensor {missing[0]!r} is missing ({len(missing)} missing in all)"
        )
    if "output.weight" not in keys:
        for s in shards:
            s["output.weight"] = s["tok_embeddings.weight"]
    tok = path / "tokenizer.model"
    return Checkpoint(path, "meta", config, tok if tok.exists() else None, _shards=shards)


def _open_hf(path: Path) -> Checkpoint:
    config = config_from_hf_json(path / "config.json")
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HarnessError(f"{index}: not a valid safetensors index ({e})") from None
        files = {name: path / f for name, f in weight_map.items()}
    elif single.exists():
        files = {name: single for name in _index_safetensors(single)}
    else:
        raise HarnessError(f"{path}: no model.safetensors or model.safetensors.index.json beside config.json")
    for f in set(files.values()):
        if not f.exists():
            raise HarnessError(f"{f}: shard named in the index is missing")
    stored = {}
    for f in set(files.values()):
        stored |= _index_safetensors(f)
    ckpt = Checkpoint(path, "hf", config, _find_tokenizer(path), _hf_files=files, _hf_index=stored)
    for name in meta_names(config):
        hf = ckpt._hf_name(name)
        if hf not in files:
            raise HarnessError(f"{path}: required tensor {hf!r} is missing")
        if hf not in stored:
            raise HarnessError(f"{files[hf]}: tensor {hf!r} is not a float tensor (BF16, F16, F32 or F64)")
    return ckpt


def _index_safetensors(path: Path) -> dict[str, Stored]:
    """Where each tensor of a .safetensors file lies; safetensors' own reader refuses a corrupt or truncated file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise HarnessError(f"{path}: cannot read safetensors file (truncated or corrupt: {e})") from None
    return index_safetensors(path)


def _merged_rows(parts: list[Stored | Loaded], dim: int | None, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop-1 of a tensor split across model-parallel shards on `dim` (None: replicated)."""
    if dim is None or len(parts) == 1:
        return parts[0].rows(start, stop)
    if dim == 1:
        return torch.cat([p.rows(start, stop) for p in parts], dim=1)
    pieces, first = [], 0
    for p in parts:  # dim 0: each shard holds the next block of rows
        lo, hi = max(start - first, 0), min(stop - first, p.shape[0])
        if lo < hi:
            pieces.append(p.rows(lo, hi))
        first += p.shape[0]
    return torch.cat(pieces) if pieces else parts[0].rows(0, 0)


def _same(a: Stored | Loaded, b: Stored | Loaded, block_bytes: int = 1 << 26) -> bool:
    """Whether two tensors hold the same values, read a block of rows at a time (64 MiB), stopping at the first
    difference: an untied output matrix differs from the embeddings in its first rows."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    step = max(1, block_bytes // (math.prod(a.shape[1:]) * a.dtype.itemsize))  # rows per block
    return all(
        torch.equal(a.rows(i, min(i + step, a.shape[0])), b.rows(i, min(i + step, a.shape[0])))
        for i in range(0, a.shape[0], step)
    )


def _find_tokenizer(path: Path) -> Path | None:
    for candidate in (path / "tokenizer.model", path / "original" / "tokenizer.model", path / "tokenizer.json"):
        if candidate.exists():
            return candidate
    return None
