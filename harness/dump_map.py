"""A port's map (docs/ports.md): its tensor names with {layer}/{head} slots -> canonical names, each with layout
transforms from a small named set (the adapter API's, and what a non-PyTorch runtime needs), read from TOML or JSON.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import names as canon
from .adapter import drop_batch, heads_first, interleave_halves, kv_to_query_heads, split_heads
from .config import ModelConfig
from .errors import HarnessError

# ---- layout transforms: each `step(x, context) -> x`, named in a map as "name" or "name(arg, ...)" -----------------


@dataclass(frozen=True)
class Context:
    """What a transform may need besides the tensor: the model's config, the run's number of tokens (T)."""

    config: ModelConfig
    n_tokens: int | None


Step = Callable[[torch.Tensor, Context], torch.Tensor]


def reverse_shape(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """[n0, n1, .., nk] -> [nk, .., n1, n0], the same values in C order (a reshape): ggml's ne[] lists a tensor's
    sizes fastest-varying first, so its data written with the shape ne[0], ne[1], .. reads back this way."""
    return x.reshape(tuple(reversed(x.shape)))


def reverse_axes(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """[a, b, .., z] -> [z, .., b, a]: every axis in reverse order (a permute: an array stored transposed)."""
    return x.permute(*reversed(range(x.dim())))


def transpose(a: str = "-2", b: str = "-1") -> Step:
    """Axes a and b swapped (by default the last two: [dim, T] -> [T, dim])."""
    i, j = _integer(a), _integer(b)
    return lambda x, ctx: x.transpose(i, j)


def reshape(*dims: str) -> Step:
    """[...] -> [d0, d1, ..], each d a number, -1, T (the run's tokens) or a config field (n_heads, head_dim, ...)."""
    for d in dims:
        if not (re.fullmatch(r"-?\d+", d) or d == "T" or d in ModelConfig.__dataclass_fields__):
            raise HarnessError(f"reshape: {d!r} is not a number, T or a config field (n_heads, n_kv_heads, head_dim)")

    def size(d: str, ctx: Context) -> int:
        return _tokens_of(ctx) if d == "T" else int(d) if d.lstrip("-").isdigit() else getattr(ctx.config, d)

    return lambda x, ctx: x.reshape(tuple(size(d, ctx) for d in dims))


def slice_tokens(axis: str = "0") -> Step:
    """[.., padded, ..] -> [.., T, ..]: the first T entries of `axis` (a port that pads its tokens or its KV cache)."""
    i = _integer(axis)
    return lambda x, ctx: x.narrow(i, 0, _tokens_of(ctx))


def scale(factor: str) -> Step:
    """x * factor: a number, or 1/sqrt(head_dim) (scores written before the scale, as llama.cpp's kq)."""
    if factor.replace(" ", "") == "1/sqrt(head_dim)":
        return lambda x, ctx: x * ctx.config.head_dim**-0.5
    try:
        number = float(factor)
    except ValueError:
        raise HarnessError(f"scale: {factor!r} is not a number or 1/sqrt(head_dim)") from None
    return lambda x, ctx: x * number


def _integer(text: str) -> int:
    if not re.fullmatch(r"-?\d+", text):
        raise HarnessError(f"{text!r} is not an axis (0, 1, .., or -1 for the last)")
    return int(text)


def _tokens_of(ctx: Context) -> int:
    if ctx.n_tokens is None:
        raise ValueError("the number of tokens is not known yet: pass --prompt or --tokens")
    return ctx.n_tokens


def _heads(count: str = "n_heads") -> Step:
    if count not in ("n_heads", "n_kv_heads"):
        raise HarnessError(f"split_heads: {count!r}: expected n_heads (q) or n_kv_heads (k, v)")
    split = split_heads(count)
    return lambda x, ctx: split(x, ctx.config)


def _adapters(f: Callable[[torch.Tensor, ModelConfig], torch.Tensor]) -> Callable[[], Step]:
    """A transform of the adapter API, f(x, config), without arguments."""
    return lambda: lambda x, ctx: f(x, ctx.config)


# The named set a map may use (the adapter API's, harness/adapter.py, and what a non-PyTorch runtime needs).
TRANSFORMS: dict[str, Callable[..., Step]] = {
    "drop_batch": _adapters(drop_batch),  # [1, ...] -> [...]
    "split_heads": _heads,  # (n_heads | n_kv_heads): [T, n * hd] -> [n, T, hd]
    "heads_first": _adapters(heads_first),  # [T, n, hd] -> [n, T, hd]
    "interleave_halves": _adapters(interleave_halves),  # q/k rows in HF's half-split order -> Meta's interleaved pairs
    "kv_to_query_heads": _adapters(kv_to_query_heads),  # [KV, ...] -> [H, ...]
    "reverse_shape": lambda: reverse_shape,  # ggml's ne[] order: [n0, .., nk] -> [nk, .., n0]
    "reverse_axes": lambda: reverse_axes,  # permute: [a, .., z] -> [z, .., a]
    "transpose": transpose,  # (a=-2, b=-1): axes a and b swapped
    "reshape": reshape,  # (d0, d1, ..): numbers, -1, T or config fields
    "slice_tokens": slice_tokens,  # (axis=0): the first T entries of a padded axis
    "scale": scale,  # (factor): a number or 1/sqrt(head_dim)
}
_SPEC = re.compile(r"\s*(\w+)\s*(?:\((.*)\))?\s*")


def parse_transform(spec: Any, where: str) -> tuple[str, Step]:
    """A map's transform, `name` or `name(arg, ...)` -> (spec, step); an unknown name or bad arguments: one line
    naming `where`."""
    m = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if m is None or m[1] not in TRANSFORMS:
        raise HarnessError(f"{where}: unknown transform {spec!r}; known: {', '.join(TRANSFORMS)} (docs/ports.md)")
    args = [a.strip() for a in m[2].split(",")] if m[2] and m[2].strip() else []
    factory = TRANSFORMS[m[1]]
    try:
        inspect.signature(factory).bind(*args)
        return spec, factory(*args)
    except TypeError:
        raise HarnessError(
            f"{where}: transform {spec!r}: {m[1]}{inspect.signature(factory)} takes other arguments"
        ) from None
    except HarnessError as e:
        raise HarnessError(f"{where}: transform {spec!r}: {e}") from None


# ---- the map: the port's names -> canonical names, and the transforms that bring each to its canonical layout --------

_SLOT = re.compile(r"\{(\w*)\}")
Steps = tuple[tuple[str, Step], ...]


@dataclass(frozen=True)
class Entry:
    """One line of a map: the port's name (`pattern`, its {layer}/{head} slots matching numbers) -> a canonical
    `name` with the same slots, or with `{head}` alone when the tensor holds every head ([H, ...]); its transforms."""

    pattern: re.Pattern
    name: str
    steps: Steps


@dataclass(frozen=True)
class DumpMap:
    """A map file read, or none (every key already canonical). Its `steps` apply to every tensor, before an entry's."""

    path: Path | None = None
    steps: Steps = ()
    entries: tuple[Entry, ...] = ()

    def match(self, key: str) -> tuple[str, Steps] | None:
        """(canonical name with the slots filled, transforms) for a key the map names (its first entry that matches)."""
        for entry in self.entries:
            if m := entry.pattern.fullmatch(key):
                name = entry.name
                for slot, value in m.groupdict().items():
                    name = name.replace("{" + slot + "}", str(int(value)))
                return name, self.steps + entry.steps
        return None


def load_map(path: str | Path) -> DumpMap:
    """A map file, .toml or .json: a table `names` (the port's name -> a canonical name, or to a table with `name` and
    `transforms`) and an optional list `transforms`, applied to every tensor first."""
    path = Path(path)
    data = _read_map(path)
    extra = sorted(set(data) - {"names", "transforms"}) if isinstance(data, dict) else []
    if not isinstance(data, dict) or not isinstance(data.get("names"), dict) or extra:
        raise HarnessError(
            f"{path}: a map holds a table `names` (the port's name -> a canonical name) and an optional list "
            f"`transforms`{f', not {extra}' if extra else ''} (docs/ports.md)"
        )
    steps = _steps(data.get("transforms", []), f"{path}: transforms")
    return DumpMap(path, steps, tuple(_entry(path, key, value) for key, value in data["names"].items()))


def _read_map(path: Path) -> Any:
    if not path.is_file():
        raise HarnessError(f"{path}: map file not found")
    if path.suffix not in (".toml", ".json"):
        raise HarnessError(f"{path}: a map is a .toml or a .json file")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            return json.loads(text)
        return toml_module().loads(text)
    except ModuleNotFoundError:
        raise HarnessError(f"{path}: reading TOML needs Python 3.11 (tomllib); write the map as .json") from None
    except OSError as e:
        raise HarnessError(f"{path}: cannot read the map ({e.strerror})") from None
    except ValueError as e:  # JSON's and TOML's decode errors, and a file that is not UTF-8
        raise HarnessError(f"{path}: not a valid {path.suffix[1:].upper()} map ({e})") from None


def _steps(specs: Any, where: str) -> Steps:
    if not isinstance(specs, list):
        raise HarnessError(f"{where}: expected a list of transforms, got {specs!r}")
    return tuple(parse_transform(spec, where) for spec in specs)


def _entry(path: Path, key: str, value: Any) -> Entry:
    """One `names` line checked: its slots ({layer}, {head}) and a canonical name on the right."""
    where = f"{path}: {key!r}"
    if isinstance(value, dict) and isinstance(value.get("name"), str) and set(value) <= {"name", "transforms"}:
        name, steps = value["name"], _steps(value.get("transforms", []), where)
    elif isinstance(value, str):
        name, steps = value, ()
    else:
        raise HarnessError(
            f"{where}: expected a canonical name, or a table with `name` and `transforms`, got {value!r}"
        )
    key_slots, name_slots = _SLOT.findall(key), set(_SLOT.findall(name))
    if unknown := [s for s in key_slots + sorted(name_slots) if s not in ("layer", "head")]:
        raise HarnessError(f"{where}: unknown slot {{{unknown[0]}}}; a map's slots are {{layer}} and {{head}}")
    if (
        len(set(key_slots)) < len(key_slots)
        or not set(key_slots) <= name_slots
        or name_slots - set(key_slots) - {"head"}
    ):
        raise HarnessError(
            f"{where} -> {name!r}: each slot once on the left, and on the right too ({{head}} alone on the right: "
            f"the tensor holds every head)"
        )
    example = name.replace("{layer}", "0").replace("{head}", "0")
    if example not in {canon.split_step(n)[1] for n in canon.canonical_names(n_layers=1, n_heads=1, steps=0)}:
        raise HarnessError(f"{where}: {name!r} is not a canonical name (README: Canonical names)")
    parts = _SLOT.split(key)  # text, slot, text, slot, ..., text
    pattern = "".join(f"(?P<{p}>\\d+)" if i % 2 else re.escape(p) for i, p in enumerate(parts))
    return Entry(re.compile(pattern), name, steps)


def toml_module():
    """tomllib (Python 3.11+), or tomli, its backport, before (a dependency there)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    return tomllib
