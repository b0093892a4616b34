"""Dumps in, traces out: the tensors a port in another runtime wrote (a .safetensors, an .npz, a folder of .npy files),
named canonically or by a map (harness/dump_map.py), recorded as a trace with shapes and dtype checked (docs/ports.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import names as canon
from .bound import UNIT_ROUNDOFF
from .checkpoint import Checkpoint, open_checkpoint
from .config import ModelConfig
from .dump_map import Context, DumpMap, Steps, load_map
from .errors import HarnessError
from .recording import record, tracing
from .tokenizer import encode_prompt, load_tokenizer

FORMATS = "a .safetensors or .npz file, or a folder of .npy files"

# ---- reading a dump: its keys, and each tensor when asked for --------------------------------------------------------


@dataclass(frozen=True)
class Dump:
    """An open dump: `keys` in the order stored, `read(key)` -> a torch tensor (float or integer)."""

    path: Path
    keys: list[str]
    read: Callable[[str], torch.Tensor]


def _from_numpy(where: str, array: np.ndarray) -> torch.Tensor:
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        raise HarnessError(
            f"{where}: 2-byte values numpy cannot name (bfloat16 from ml_dtypes/JAX?): write them as float32, exact, "
            f"and pass --dtype bfloat16"
        )
    if array.dtype.kind in "iu":
        return torch.from_numpy(array.astype(np.int64))
    if array.dtype.kind != "f" or array.dtype.itemsize not in (2, 4, 8):
        raise HarnessError(f"{where}: values of dtype {array.dtype}; a dump holds floats (and integer tokens)")
    return torch.from_numpy(np.ascontiguousarray(array.astype(array.dtype.newbyteorder("="), copy=False)))


def _load(where: str, load: Callable[[], np.ndarray]) -> torch.Tensor:
    try:
        return _from_numpy(where, load())
    except (OSError, ValueError, EOFError) as e:  # truncated, pickled objects, a bad header
        raise HarnessError(f"{where}: cannot read it ({e})") from None


@contextmanager
def open_dump(path: str | Path) -> Iterator[Dump]:
    """The dump at `path`: an .npz (numpy.savez), a .safetensors, or a folder of NAME.npy files (NAME the key; files
    in subfolders are keyed by their relative path with `/` as `.`)."""
    path = Path(path)
    if not path.exists():
        raise HarnessError(f"{path}: dump not found (expected {FORMATS})")
    if path.is_dir():
        files = {".".join(p.relative_to(path).with_suffix("").parts): p for p in sorted(path.rglob("*.npy"))}
        if not files:
            raise HarnessError(f"{path}: no .npy files in this folder (expected {FORMATS})")
        yield Dump(path, list(files), lambda key: _load(f"{files[key]}", lambda: np.load(files[key])))
    elif path.suffix == ".npz":
        try:
            npz = np.load(path)
        except (OSError, ValueError, EOFError) as e:
            raise HarnessError(f"{path}: not a readable .npz ({e})") from None
        with npz:
            yield Dump(path, list(npz.files), lambda key: _load(f"{path}: {key!r}", lambda: npz[key]))
    elif path.suffix == ".safetensors":
        yield _safetensors(path)
    else:
        raise HarnessError(f"{path}: not a dump (expected {FORMATS})")


def _safetensors(path: Path) -> Dump:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:  # the header only; tensors are read by key
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError on a bad header
        raise HarnessError(f"{path}: not a readable .safetensors ({e})") from None

    def read(key: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            x = f.get_tensor(key)
        if x.is_floating_point() and str(x.dtype).removeprefix("torch.") in UNIT_ROUNDOFF:
            return x
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise HarnessError(f"{path}: {key!r}: values of dtype {x.dtype}; a dump holds floats (and integer tokens)")
        return x.long()

    return Dump(path, keys, read)


# ---- what a dump gives: each key's canonical name, its tensor transformed, shape and dtype checked, recorded --------


@dataclass(frozen=True)
class Item:
    """A dump key to record: its canonical name (with "{head}": the tensor holds every head, [H, ...]), transforms."""

    key: str
    name: str
    steps: Steps


@dataclass(frozen=True)
class Plan:
    """A dump's keys sorted out: what to record (forward order), where its tokens are, the keys it leaves out."""

    items: list[Item]
    tokens: Item | None
    not_canonical: list[str]


def _model_names(config: ModelConfig) -> set[str]:
    """The canonical names of this model, outside generation."""
    return set(canon.canonical_names(config.n_layers, config.n_heads))


def _heads_of(name: str, config: ModelConfig) -> list[str]:
    return [name.replace("{head}", str(h)) for h in range(config.n_heads)] if "{head}" in name else [name]


def plan(dump: Dump, dump_map: DumpMap, config: ModelConfig) -> Plan:
    """Each key of the dump: named by the map, canonical already, or neither (listed, not imported)."""
    items, unknown, given, model_names = [], [], {}, _model_names(config)
    for key in dump.keys:
        mapped = dump_map.match(key)
        if mapped is None and key not in model_names:
            unknown.append(key)
            continue
        name, steps = mapped or (key, dump_map.steps)
        if name.replace("{head}", "0") not in model_names:
            raise HarnessError(
                f"{dump.path}: {key!r} maps to {name!r}, not a name of this model ({config.n_layers} layers, "
                f"{config.n_heads} heads)"
            )
        for one in _heads_of(name, config):
            if one in given:
                raise HarnessError(f"{dump.path}: {given[one]!r} and {key!r} both give {one!r}")
            given[one] = key
        items.append(Item(key, name, steps))
    tokens = next((item for item in items if item.name == "tokens"), None)
    items = [item for item in items if item.name != "tokens"]
    items.sort(key=lambda item: canon.order_key(item.name.replace("{head}", "0")))
    return Plan(items, tokens, unknown)


def _transformed(dump: Dump, item: Item, ctx: Context) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(the tensor in its canonical layout, its shape in the dump)."""
    x = dump.read(item.key)
    stored = tuple(x.shape)
    for spec, step in item.steps:
        try:
            x = step(x, ctx)
        except (HarnessError, RuntimeError, ValueError, IndexError) as e:
            reason = str(e).removeprefix("adapter: ").splitlines()[0]
            raise HarnessError(
                f"{dump.path}: {item.key!r} of shape {list(x.shape)}: transform {spec!r} failed ({reason})"
            ) from None
    return x, stored


def _checked(dump: Dump, item: Item, ctx: Context, dtype: str) -> torch.Tensor:
    """The item's tensor, of the shape its canonical name has in this run and no less precise than the run's dtype."""
    x, stored = _transformed(dump, item, ctx)
    one = canon.shape_of(item.name.replace("{head}", "0"), ctx.config, ctx.n_tokens)
    want = (ctx.config.n_heads, *one) if "{head}" in item.name else one
    if tuple(x.shape) != want:
        how = f" ({list(stored)} in the dump, then {', '.join(s for s, _ in item.steps)})" if item.steps else ""
        raise HarnessError(
            f"{dump.path}: {item.key!r} -> {item.name!r}: shape {list(x.shape)}{how}, expected {list(want)}"
        )
    if not x.is_floating_point():
        raise HarnessError(f"{dump.path}: {item.key!r} holds integers; every name but tokens holds floats")
    got = str(x.dtype).removeprefix("torch.")
    if UNIT_ROUNDOFF[got] > UNIT_ROUNDOFF[dtype]:
        raise HarnessError(
            f"{dump.path}: {item.key!r} holds {got} values, the run's dtype is {dtype}: pass --dtype {got}, what the "
            f"port computed in"
        )
    return x


def record_dump(dump: Dump, planned: Plan, ctx: Context, dtype: str) -> tuple[list[str], torch.Tensor | None]:
    """Record every planned tensor but the tokens in the open trace: (the names recorded, the logits [T, V] if any)."""
    names, logits = [], None
    for item in planned.items:
        x = _checked(dump, item, ctx, dtype)
        if "{head}" in item.name:  # [H, ...]: one name per head
            for head, name in enumerate(_heads_of(item.name, ctx.config)):
                record(name, x[head])
                names.append(name)
            continue
        record(item.name, x)
        names.append(item.name)
        logits = x if item.name == "logits" else logits
    return names, logits


def dump_tokens(dump: Dump, planned: Plan, ctx: Context) -> list[int] | None:
    """The token ids the dump holds (integers, or floats holding integers), None when it holds none."""
    if planned.tokens is None:
        return None
    x, _ = _transformed(dump, planned.tokens, ctx)
    whole = not x.is_floating_point() or bool(torch.equal(x, x.round()))
    if x.dim() != 1 or x.numel() == 0 or not whole:
        what = f"shape {list(x.shape)}" if whole else "values that are not whole numbers"
        raise HarnessError(f"{dump.path}: {planned.tokens.key!r}: tokens of {what}; expected [T] token ids")
    return [int(t) for t in x.tolist()]


def run_tokens(where: str, given: list[int] | None, dumped: list[int] | None, config: ModelConfig) -> list[int]:
    """The run's tokens: those given (checked against the dump's, when it has some), else the dump's."""
    if given is not None and dumped is not None and given != dumped:
        at = next((i for i, (a, b) in enumerate(zip(given, dumped)) if a != b), min(len(given), len(dumped)))
        raise HarnessError(
            f"{where}: the dump ran other tokens ({len(dumped)}) than this run ({len(given)}), first difference at "
            f"position {at}: give the prompt the port ran"
        )
    tokens = given if given is not None else dumped
    if tokens is None:
        raise HarnessError(
            f"{where}: no 'tokens' in the dump: pass --prompt (the text after <|begin_of_text|>) or --tokens"
        )
    if bad := [t for t in tokens if not 0 <= t < config.vocab_size]:
        raise HarnessError(
            f"{where}: token id {bad[0]} is outside the model's vocabulary (0 .. {config.vocab_size - 1})"
        )
    if len(tokens) > config.max_seq_len:
        raise HarnessError(f"{where}: {len(tokens)} tokens, longer than the model's context of {config.max_seq_len}")
    return tokens


# ---- a dump imported as a trace (`import`), or traced as an implementation (`--impl dump:PATH?map=MAP`) -------------


@dataclass(frozen=True)
class Imported:
    """What `import_dump` recorded: the canonical names (`tokens` first) and the tokens; the keys it left out."""

    names: list[str]
    tokens: list[int]
    not_canonical: list[str]
    n_model_names: int  # how many canonical names the model has


def dump_spec(dump: str | Path, map_path: str | Path | None = None) -> str:
    """The dump named as `--impl` names it, and as its trace's `implementation` attribute says."""
    return f"dump:{dump}" + (f"?map={map_path}" if map_path is not None else "")


def import_dump(
    dump_path: str | Path,
    checkpoint: Checkpoint | str | Path,
    out: str | Path,
    *,
    map_path: str | Path | None = None,
    tokens: list[int] | None = None,
    prompt: str | None = None,
    dtype: str = "float32",
) -> Imported:
    """The dump at `dump_path` recorded as a trace at `out`, stamped with `checkpoint`'s fingerprint. `tokens` (and the
    `prompt` they encode): the run's, when the dump holds none or to check its own against; `dtype`: what the port
    computed in (numpy has no bfloat16: a bfloat16 port writes float32 values, exact, and says so here)."""
    if dtype not in UNIT_ROUNDOFF:
        raise HarnessError(f"unknown dtype {dtype!r}; choose one of {', '.join(UNIT_ROUNDOFF)}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    config = ckpt.config
    dump_map = load_map(map_path) if map_path is not None else DumpMap()
    with open_dump(dump_path) as dump:
        planned = plan(dump, dump_map, config)
        if not planned.items:
            shown = ", ".join(map(repr, dump.keys[:5])) + (", ..." if len(dump.keys) > 5 else "")
            raise HarnessError(
                f"{dump.path}: no key is a canonical name of this model or named by a map ({shown}); write a map "
                f"(docs/ports.md)"
            )
        dumped = dump_tokens(dump, planned, Context(config, len(tokens) if tokens else None))
        ran = run_tokens(str(dump.path), tokens, dumped, config)
        prompt = prompt if prompt is not None else _prompt_of(ckpt, ran)
        meta = dict(  # harness/run.py's trace_metadata, for a run that is the dump's (and where it came from)
            implementation=dump_spec(dump_path, map_path),
            dtype=dtype,
            device="cpu",
            tokens=ran,
            checkpoint=ckpt,
            isolated=False,
            **({"prompt": prompt} if prompt is not None else {}),  # none when no prompt gives the dump's tokens
            **_source(dump_path, map_path),
        )
        with tracing(out, **meta):
            record("tokens", torch.tensor(ran))  # [T]
            names, _ = record_dump(dump, planned, Context(config, len(ran)), dtype)
    return Imported(["tokens", *names], ran, planned.not_canonical, len(_model_names(config)))


def _source(dump_path: str | Path, map_path: str | Path | None) -> dict[str, str]:
    return {"dump": str(dump_path), **({"dump_map": str(map_path)} if map_path is not None else {})}


def _prompt_of(ckpt: Checkpoint, tokens: list[int]) -> str | None:
    """The prompt whose tokens these are (`[<|begin_of_text|>] + encode(prompt)`), when one is."""
    if ckpt.tokenizer_path is None:
        return None
    enc = load_tokenizer(ckpt.tokenizer_path)
    if any(t >= enc.n_vocab for t in tokens):
        return None
    text = enc.decode(tokens[1:])
    return text if encode_prompt(enc, text) == tokens else None


def is_dump_spec(spec: str) -> bool:
    """`--impl dump:PATH[?map=MAP]` names a dump; `dump:NAME` with NAME an identifier that is no file or folder is still
    a module `dump` and its attribute NAME, as before dumps were read."""
    rest = spec.removeprefix("dump:")
    return spec.startswith("dump:") and (not rest.isidentifier() or Path(rest).exists())


def dump_forward(spec: str) -> tuple[Callable[..., torch.Tensor], dict[str, str]]:
    """`--impl dump:PATH[?map=MAP]`: (a forward of the contract that records the dump's tensors, checks the dump ran the
    run's tokens and returns its logits; the trace's metadata). A missing dump or a bad map is refused now."""
    path, _, map_path = spec.removeprefix("dump:").partition("?map=")
    dump_map = load_map(map_path) if map_path else DumpMap()
    with open_dump(path):
        pass

    def forward(checkpoint: Checkpoint, tokens: torch.Tensor, *, dtype: torch.dtype, device: Any) -> torch.Tensor:
        config = checkpoint.config
        ctx = Context(config, len(tokens))
        with open_dump(path) as dump:
            planned = plan(dump, dump_map, config)
            run_tokens(path, tokens.tolist(), dump_tokens(dump, planned, ctx), config)
            _, logits = record_dump(dump, planned, ctx, str(dtype).removeprefix("torch."))
        if logits is None:
            raise HarnessError(f"{path}: no logits in the dump: verify needs the port's logits (import does without)")
        return logits  # [T, V]

    return forward, _source(path, map_path or None)
