"""Deterministic tiny Llama-3 checkpoints in Meta's exact format (bf16, real key names, params.json, tokenizer.model).

Weights are scaled to be *sensitive*: peaked attention, norm weights far from 1, every component moving the output.
Real-size shapes (`--shape 8b-wide`, `70b-wide`, `405b-wide`) for benchmarks are written a block of rows at a time.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from filelock import FileLock

from .checkpoint import expected_shape, meta_names
from .config import config_from_params_json
from .errors import HarnessError
from .tensor_files import index_pth
from .tokenizer import NUM_RESERVED_SPECIAL_TOKENS, train_tokenizer, write_tokenizer_model

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"
N_MERGES = 256  # 256 byte tokens + 256 merges = 512 BPE ranks; + 256 special tokens = vocab 768

# params.json of each variant, as Meta writes it (vocab_size filled in from the tokenizer).
_LLAMA_30 = dict(
    dim=128,
    n_layers=3,
    n_heads=8,
    n_kv_heads=2,
    multiple_of=32,
    ffn_dim_multiplier=1.3,
    norm_eps=1e-5,
    rope_theta=500000.0,
)
VARIANTS: dict[str, dict] = {
    "3.0": _LLAMA_30,
    "3.1": dict(_LLAMA_30, use_scaled_rope=True),  # 3.0 with Llama 3.1's scaled RoPE
    # 3.2: tied embeddings, 3 query heads per KV head (as the 3B)
    "3.2": dict(
        dim=96,
        n_layers=3,
        n_heads=6,
        n_kv_heads=2,
        multiple_of=32,
        ffn_dim_multiplier=1.5,
        norm_eps=1e-5,
        rope_theta=500000.0,
        use_scaled_rope=True,
    ),
}
TIED = {"3.2"}

# Standard deviation of each weight, times 1/sqrt(fan_in). q and k at 2: scores of std ~4, so attention is peaked
# rather than uniform; the output projection at 3: logits of std ~3, so the next token is a clear choice; w2 at 2.5
# and embeddings at 0.5: every layer's feed-forward and attention move the residual stream as much as the token
# embedding does. Chosen by tests/test_sensitivity.py: with these, 17 of the 19 catalogued bugs change the next
# token on every variant (the usual 0.02 scale, and even 1/sqrt(fan_in) everywhere, leave half of them unseen).
_GAIN = {
    "tok_embeddings": 0.5,
    "wq": 2.0,
    "wk": 2.0,
    "wv": 1.0,
    "wo": 1.0,
    "w1": 1.0,
    "w3": 1.0,
    "w2": 2.5,
    "output": 3.0,
}


def _generator(seed: int, name: str) -> torch.Generator:
    # one stream per tensor, so a tensor does not depend on the order the others are made in
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def make_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    blocks = list(tensor_blocks(name, shape, seed))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def tensor_blocks(name: str, shape: tuple[int, ...], seed: int) -> Iterator[torch.Tensor]:
    """A weight's values in bf16, whole, or for a big one a block of rows at a time (one stream per tensor)."""
    g = _generator(seed, name)
    part = name.removesuffix(".weight").split(".")[-1]
    if part.endswith("norm"):
        yield (0.5 + torch.rand(shape, generator=g)).to(torch.bfloat16)  # far from 1: a dropped weight shows
        return
    std = _GAIN[part] if part == "tok_embeddings" else _GAIN[part] / shape[1] ** 0.5
    if len(shape) < 2 or shape[0] * shape[1] <= _CHUNK_ELEMENTS:
        yield (torch.randn(shape, generator=g) * std).to(torch.bfloat16)
        return
    # big shapes: bf16 straight away, a block of rows at a time through one float32 buffer: no float32 copy of a
    # 128256 x 4096 embedding, and no float32 temporaries between the kept weights to fragment the heap
    rows = max(1, _CHUNK_ELEMENTS // shape[1])
    buffer = torch.empty(rows, shape[1])
    for start in range(0, shape[0], rows):
        draw = torch.randn(min(rows, shape[0] - start), shape[1], generator=g, out=buffer[: shape[0] - start])
        yield draw.mul_(std).to(torch.bfloat16)


# Tensors up to this size are drawn whole, as they always were (the tiny ones have at most 98304 elements: their
# bytes stay put). Every 8B-shape matrix is drawn in blocks of at most this size (4 MiB in float32).
_CHUNK_ELEMENTS = 1 << 20

# `--shape`: params.json of real-size models for benchmarks (the tiny tokenizer's 768 ids fit any vocabulary).
SHAPES: dict[str, dict | None] = {
    "tiny": None,  # the --variant's own tiny params
    # Meta-Llama-3-8B's width, heads, KV heads, FFN (14336) and vocabulary, with 2 layers
    "8b-wide": dict(
        dim=4096,
        n_layers=2,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        multiple_of=1024,
        ffn_dim_multiplier=1.3,
        norm_eps=1e-5,
        rope_theta=500000.0,
    ),
}
SHAPES["8b"] = dict(SHAPES["8b-wide"], n_layers=32)  # Meta-Llama-3-8B's shape, all 32 layers
# Meta-Llama-3-70B's width (8192), 64 query heads over 8 KV heads, FFN (28672) and vocabulary, with 2 layers: 1.7 GB a
# layer in bf16, the embeddings and the output 2.1 GB each
SHAPES["70b-wide"] = dict(SHAPES["8b-wide"], dim=8192, n_heads=64, multiple_of=4096)
# Llama-3.1-405B's width (16384), 128 query heads over 8 KV heads, FFN (53248), vocabulary: 6.4 GB a layer in bf16
SHAPES["405b-wide"] = dict(SHAPES["70b-wide"], dim=16384, n_heads=128, ffn_dim_multiplier=1.2)


def shape_params(shape: str, variant: str, layers: int | None = None) -> dict | None:
    """params.json of `--shape` for `--variant` (3.1/3.2 add use_scaled_rope) with `layers` decoder layers (default:
    the shape's); None for the tiny shape with its own layers."""
    if shape not in SHAPES:
        raise HarnessError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if layers is not None and (not isinstance(layers, int) or layers < 1):
        raise HarnessError(f"--layers {layers}: expected a number of decoder layers, 1 or more")
    if SHAPES[shape] is None:
        return None if layers is None else dict(VARIANTS[variant], n_layers=layers)
    params = dict(SHAPES[shape])
    if VARIANTS[variant].get("use_scaled_rope"):
        params["use_scaled_rope"] = True
    return params if layers is None else dict(params, n_layers=layers)


def write_by_blocks(path: Path, shapes: dict[str, tuple[int, ...]], blocks) -> None:
    """The file torch.save writes of these bf16 tensors, never holding one whole: torch.save writes the archive with
    room for each (`skip_data`; the empty tensors are never touched, so they take no memory), then `blocks(name)`'s
    blocks of rows are written into place and each record's CRC-32 set, as torch.save would have."""
    with torch.serialization.skip_data():
        torch.save({name: torch.empty(shape, dtype=torch.bfloat16) for name, shape in shapes.items()}, path)
    crcs = {}  # CRC-32 of each tensor's bytes, by their offset in the file
    with open(path, "r+b") as f:
        for name, stored in index_pth(path).items():
            f.seek(stored.offset)
            crc = 0
            for block in blocks(name):
                data = block.contiguous().view(torch.uint8).numpy()
                f.write(data)
                crc = zlib.crc32(data, crc)
            crcs[stored.offset] = crc
        _set_crcs(f, crcs)


def _set_crcs(f, crcs: dict[int, int]) -> None:
    """Write each record's CRC-32 (`crcs`: by the offset of its data) where a zip file keeps it: its central directory
    entry and the data descriptor after its data (torch's records have one: flag bit 3, so the local header's is 0)."""
    with zipfile.ZipFile(f) as archive:
        records, central = archive.infolist(), archive.start_dir
    for info in records:
        f.seek(info.header_offset + 26)
        name_length, extra_length = (int.from_bytes(f.read(2), "little") for _ in range(2))
        start = info.header_offset + 30 + name_length + extra_length
        if start in crcs:
            crc = crcs[start].to_bytes(4, "little")
            f.seek(start + info.compress_size)
            descriptor = f.read(4)
            f.seek(start + info.compress_size + (4 if descriptor == b"PK\x07\x08" else 0))
            f.write(crc)
            f.seek(central + 16)
            f.write(crc)
        central += 46 + len(info.orig_filename.encode()) + len(info.extra) + len(info.comment)


def _check_new_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise HarnessError(f"{out}: is a file, expected a directory; choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise HarnessError(f"{out}: output directory is not empty; choose a new directory")
    if not out.parent.is_dir():
        raise HarnessError(f"{out}: parent folder {out.parent} does not exist; create it first")


def make_tiny_meta(out: Path, *, seed: int = 0, variant: str = "3.0", params: dict | None = None) -> None:
    """Write params.json, consolidated.00.pth and tokenizer.model into `out` (created; must be empty or absent)."""
    if variant not in VARIANTS:
        raise HarnessError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    out = Path(out)
    _check_new_dir(out)
    ranks = train_tokenizer(CORPUS.read_text(encoding="utf-8"), N_MERGES)
    p = dict(params or VARIANTS[variant])
    p["vocab_size"] = p.get("vocab_size", len(ranks) + NUM_RESERVED_SPECIAL_TOKENS)
    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        (out / "params.json").write_text(json.dumps(p, indent=2) + "\n")
        config = config_from_params_json(out / "params.json")
        shapes = {name: expected_shape(config, name) for name in meta_names(config)}
        drawn = {name: name for name in shapes} | (
            {"output.weight": "tok_embeddings.weight"} if variant in TIED else {}
        )
        if max(math.prod(shape) for shape in shapes.values()) > _CHUNK_ELEMENTS:  # a real-size shape
            write_by_blocks(
                out / "consolidated.00.pth", shapes, lambda name: tensor_blocks(drawn[name], shapes[name], seed)
            )
        else:  # the tiny shapes, saved whole as they always were (their bytes are in golden/manifest.json)
            torch.save(
                {name: make_tensor(drawn[name], shape, seed) for name, shape in shapes.items()},
                out / "consolidated.00.pth",
            )
        write_tokenizer_model(ranks, out / "tokenizer.model")
    except BaseException:
        for f in ("params.json", "consolidated.00.pth", "tokenizer.model"):
            (out / f).unlink(missing_ok=True)
        if created:
            out.rmdir()
        raise


def make_tiny(
    out: Path, *, seed: int = 0, variant: str = "3.0", fmt: str = "meta", shape: str = "tiny", layers: int | None = None
) -> None:
    """`make-tiny`: Meta format directly; HF format by converting a Meta one written to a temporary folder. Either way
    `tiny.json` beside the weights says how to make it again (`read_recipe`, `remake`). `layers`: that many decoder
    layers instead of the shape's."""
    if variant not in VARIANTS:
        raise HarnessError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    params = shape_params(shape, variant, layers)
    recipe = dict(variant=variant, seed=seed, format=fmt, shape=shape) | ({} if layers is None else {"layers": layers})
    if fmt == "meta":
        make_tiny_meta(out, seed=seed, variant=variant, params=params)
        return write_recipe(Path(out), recipe)
    if fmt != "hf":
        raise HarnessError(f"unknown format {fmt!r}; choose meta or hf")
    from .convert import convert

    out = Path(out)
    _check_new_dir(out)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
        make_tiny_meta(Path(tmp) / "meta", seed=seed, variant=variant, params=params)
        convert(Path(tmp) / "meta", out, to="hf")
    write_recipe(out, recipe)


# ---- the recipe: how a tiny checkpoint was made, so a golden set (harness/golden_set.py) can make it again ----------

RECIPE_FILE = "tiny.json"
RECIPE_KEYS = ("variant", "seed", "format", "shape")


def write_recipe(out: Path, recipe: dict) -> None:
    text = json.dumps(dict(made_by="python -m harness make-tiny", **recipe), indent=1)
    (Path(out) / RECIPE_FILE).write_text(text + "\n")


def read_recipe(checkpoint_dir: str | Path) -> dict | None:
    """(variant, seed, format, shape, and `layers` when given) from a checkpoint's `tiny.json`; None when it has none
    (not made by make-tiny)."""
    path = Path(checkpoint_dir) / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        recipe = {key: data[key] for key in RECIPE_KEYS} | ({"layers": data["layers"]} if "layers" in data else {})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HarnessError(f"{path}: not a make-tiny recipe ({type(e).__name__}: {e})") from None
    known = recipe["variant"] in VARIANTS and recipe["format"] in ("meta", "hf") and recipe["shape"] in SHAPES
    known = known and (not isinstance(recipe.get("layers"), bool) and isinstance(recipe.get("layers", 1), int))
    if not known or not isinstance(recipe["seed"], int):
        raise HarnessError(f"{path}: unknown make-tiny recipe {recipe} (variants {', '.join(VARIANTS)})")
    return recipe


def remake(recipe: dict, out: Path) -> Path:
    """The tiny checkpoint of `recipe` made again in `out` (new or empty): bit-identical for one torch version."""
    make_tiny(
        out,
        seed=recipe["seed"],
        variant=recipe["variant"],
        fmt=recipe["format"],
        shape=recipe["shape"],
        layers=recipe.get("layers"),
    )
    return Path(out)


def make_tiny_once(root: Path, variant: str, seed: int) -> Path:
    """The tiny checkpoint of (variant, seed) under `root`, made once (under a file lock) and reused."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"tiny-{variant}-seed{seed}"
    with FileLock(str(root / f".tiny-{variant}-seed{seed}.lock")):
        if not out.exists():
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{out.name}."))
            make_tiny_meta(tmp / "ckpt", seed=seed, variant=variant)
            write_recipe(tmp / "ckpt", dict(variant=variant, seed=seed, format="meta", shape="tiny"))
            os.replace(tmp / "ckpt", out)
            tmp.rmdir()
    return out
