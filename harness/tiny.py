"""Deterministic tiny Llama-3 checkpoints in Meta's exact format (bf16, real key names, params.json, tokenizer.model).

Weights are scaled to be *sensitive*: peaked attention, norm weights far from 1, every component moving the output.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from pathlib import Path

import torch
from filelock import FileLock

from .checkpoint import expected_shape, meta_names
from .config import config_from_params_json
from .errors import HarnessError
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
    g = _generator(seed, name)
    part = name.removesuffix(".weight").split(".")[-1]
    if part.endswith("norm"):
        return (0.5 + torch.rand(shape, generator=g)).to(torch.bfloat16)  # far from 1: a dropped weight shows
    std = _GAIN[part] if part == "tok_embeddings" else _GAIN[part] / shape[1] ** 0.5
    if len(shape) < 2 or shape[0] * shape[1] <= _CHUNK_ELEMENTS:
        return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)
    # big shapes: bf16 straight away, a block of rows at a time through one float32 buffer: no float32 copy of a
    # 128256 x 4096 embedding, and no float32 temporaries between the kept weights to fragment the heap
    out = torch.empty(shape, dtype=torch.bfloat16)
    rows = max(1, _CHUNK_ELEMENTS // shape[1])
    buffer = torch.empty(rows, shape[1])
    for start in range(0, shape[0], rows):
        block = out[start : start + rows]
        draw = torch.randn(block.shape, generator=g, out=buffer[: block.shape[0]])
        block.copy_(draw.mul_(std))
    return out


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


def shape_params(shape: str, variant: str) -> dict | None:
    """params.json of `--shape` for `--variant` (3.1/3.2 add use_scaled_rope); None for the tiny shape."""
    if shape not in SHAPES:
        raise HarnessError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if SHAPES[shape] is None:
        return None
    params = dict(SHAPES[shape])
    if VARIANTS[variant].get("use_scaled_rope"):
        params["use_scaled_rope"] = True
    return params


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
        state_dict = {}
        for name in meta_names(config):
            state_dict[name] = make_tensor(name, expected_shape(config, name), seed)
        if variant in TIED:
            state_dict["output.weight"] = state_dict["tok_embeddings.weight"].clone()
        torch.save(state_dict, out / "consolidated.00.pth")
        write_tokenizer_model(ranks, out / "tokenizer.model")
    except BaseException:
        for f in ("params.json", "consolidated.00.pth", "tokenizer.model"):
            (out / f).unlink(missing_ok=True)
        if created:
            out.rmdir()
        raise


def make_tiny(out: Path, *, seed: int = 0, variant: str = "3.0", fmt: str = "meta", shape: str = "tiny") -> None:
    """`make-tiny`: Meta format directly; HF format by converting a Meta one written to a temporary folder. Either way
    `tiny.json` beside the weights says how to make it again (`read_recipe`, `remake`)."""
    if variant not in VARIANTS:
        raise HarnessError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    params = shape_params(shape, variant)
    if fmt == "meta":
        make_tiny_meta(out, seed=seed, variant=variant, params=params)
        return write_recipe(Path(out), dict(variant=variant, seed=seed, format=fmt, shape=shape))
    if fmt != "hf":
        raise HarnessError(f"unknown format {fmt!r}; choose meta or hf")
    from .convert import convert

    out = Path(out)
    _check_new_dir(out)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
        make_tiny_meta(Path(tmp) / "meta", seed=seed, variant=variant, params=params)
        convert(Path(tmp) / "meta", out, to="hf")
    write_recipe(out, dict(variant=variant, seed=seed, format=fmt, shape=shape))


# ---- the recipe: how a tiny checkpoint was made, so a golden set (harness/golden_set.py) can make it again ----------

RECIPE_FILE = "tiny.json"
RECIPE_KEYS = ("variant", "seed", "format", "shape")


def write_recipe(out: Path, recipe: dict) -> None:
    text = json.dumps(dict(made_by="python -m harness make-tiny", **recipe), indent=1)
    (Path(out) / RECIPE_FILE).write_text(text + "\n")


def read_recipe(checkpoint_dir: str | Path) -> dict | None:
    """(variant, seed, format, shape) from a checkpoint's `tiny.json`; None when it has none (not made by make-tiny)."""
    path = Path(checkpoint_dir) / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        recipe = {key: data[key] for key in RECIPE_KEYS}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HarnessError(f"{path}: not a make-tiny recipe ({type(e).__name__}: {e})") from None
    known = recipe["variant"] in VARIANTS and recipe["format"] in ("meta", "hf") and recipe["shape"] in SHAPES
    if not known or not isinstance(recipe["seed"], int):
        raise HarnessError(f"{path}: unknown make-tiny recipe {recipe} (variants {', '.join(VARIANTS)})")
    return recipe


def remake(recipe: dict, out: Path) -> Path:
    """The tiny checkpoint of `recipe` made again in `out` (new or empty): bit-identical for one torch version."""
    make_tiny(out, seed=recipe["seed"], variant=recipe["variant"], fmt=recipe["format"], shape=recipe["shape"])
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
