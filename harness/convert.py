"""Meta <-> Hugging Face checkpoint conversion (transformers 5.x no longer ships convert_llama_weights_to_hf.py).

HF: config.json, model.safetensors (q/k rows permuted for rotate_half), generation_config.json, a tokenizer made
from tokenizer.model by transformers' TikTokenConverter, and tokenizer.model kept in original/ as Meta's HF repos do.
Meta: params.json, consolidated.00.pth, tokenizer.model. Written in a temporary sibling folder, then renamed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from . import hf_layout
from .checkpoint import Checkpoint, open_checkpoint
from .config import META_ROPE_SCALING, ModelConfig, config_from_params_json, ffn_dim_from_meta
from .errors import HarnessError
from .tokenizer import BOS, PAT_STR, SPECIAL_TOKENS, load_tokenizer, read_ranks, write_tokenizer_model


@contextmanager
def _new_directory(dst: Path):
    """Yield a temporary sibling of `dst`; it becomes `dst` only if the block succeeds (dst must be new or empty)."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise HarnessError(f"{dst}: output exists and is not an empty directory; choose a new directory")
    if not dst.parent.is_dir():
        raise HarnessError(f"{dst}: parent folder {dst.parent} does not exist; create it first")
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
    try:
        yield tmp
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def convert(src: str | Path, dst: str | Path, *, to: str) -> None:
    """Write the checkpoint at `src` (Meta or HF) into the new directory `dst` in the other format."""
    if to not in ("hf", "meta"):
        raise HarnessError(f"unknown target format {to!r}; choose hf or meta")
    ckpt = open_checkpoint(src)
    if ckpt.format == to:
        name = "Hugging Face" if to == "hf" else "Meta"
        raise HarnessError(
            f"{ckpt.path}: already a {name} checkpoint; --to {to} would only copy it (use --to "
            f"{'meta' if to == 'hf' else 'hf'} for the other format)"
        )
    if ckpt.tokenizer_path is None:
        raise HarnessError(f"{ckpt.path}: no tokenizer.model or tokenizer.json to convert")
    with _new_directory(Path(dst)) as out:
        (write_hf if to == "hf" else write_meta)(ckpt, out)


# ---- to Hugging Face ---------------------------------------------------------------------------------------------


def write_hf(ckpt: Checkpoint, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    config = ckpt.config
    enc = load_tokenizer(ckpt.tokenizer_path)
    cfg = hf_layout.hf_config(config)
    cfg.bos_token_id, cfg.eos_token_id = enc.encode_single_token(BOS), enc.encode_single_token("<|end_of_text|>")
    cfg.dtype = _dtype_name(ckpt.tensor("tok_embeddings.weight").dtype)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(out)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id).save_pretrained(out)
    tensors = {}
    for name in ckpt.names():
        if name == "output.weight" and config.tie_word_embeddings:
            continue  # tied: HF keeps only model.embed_tokens.weight
        t = ckpt.tensor(name)
        if heads := hf_layout.heads_of(name):
            t = hf_layout.permute_to_hf(t, getattr(config, heads))
        tensors[hf_layout.meta_to_hf_name(name)] = t.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_hf_tokenizer(ckpt.tokenizer_path, out)
    write_params(ckpt, out / "original" / "params.json")  # as Meta's HF repos: multiple_of etc. survive the trip


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_hf_tokenizer(tokenizer_model: Path, out: Path) -> None:
    """tokenizer.json etc. by transformers' TikTokenConverter (5.x: `extra_special_tokens`), BOS prepended."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if tokenizer_model.suffix == ".json":  # an HF source without tokenizer.model: rebuild one from tokenizer.json
        ranks = read_ranks(tokenizer_model)
        tokenizer_model = out / ".tokenizer.model"
        write_tokenizer_model(ranks, tokenizer_model)
    tokenizer = TikTokenConverter(
        vocab_file=str(tokenizer_model), pattern=PAT_STR, extra_special_tokens=SPECIAL_TOKENS
    ).converted()
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token="<|end_of_text|>",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=True,
    )
    fast.save_pretrained(out)
    (out / "original").mkdir(exist_ok=True)
    shutil.copyfile(tokenizer_model, out / "original" / "tokenizer.model")
    if tokenizer_model.name == ".tokenizer.model":
        tokenizer_model.unlink()


# ---- to Meta ------------------------------------------------------------------------------------------------------


def meta_params(config: ModelConfig, source: Path) -> dict:
    """params.json as Meta writes it; `multiple_of`/`ffn_dim_multiplier` found when the source (HF) lacks them."""
    multiple_of, multiplier = config.multiple_of, config.ffn_dim_multiplier
    if multiple_of is None:
        multiple_of, multiplier = _find_ffn_params(config.dim, config.ffn_dim, source)
    params = dict(
        dim=config.dim,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        n_kv_heads=config.n_kv_heads,
        vocab_size=config.vocab_size,
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
    )
    if multiplier is None:
        del params["ffn_dim_multiplier"]
    if s := config.rope_scaling:
        params["use_scaled_rope"] = True
        if s.factor != META_ROPE_SCALING["factor"]:  # Meta's code hard-codes 8; say so when it is not
            params["rope_scaling_factor"] = s.factor
    if config.max_seq_len != (131072 if s else 8192):  # params.json's default context, as config.py reads it
        params["max_seq_len"] = config.max_seq_len
    return params


def _find_ffn_params(dim: int, ffn_dim: int, source: Path) -> tuple[int, float | None]:
    """`multiple_of` and `ffn_dim_multiplier` that give `ffn_dim` through Meta's formula: the largest power-of-two
    `multiple_of` that works, with no multiplier or the one of fewest decimals (8B: 2048, 1.3; 70B: 4096, 1.3)."""
    base = int(2 * 4 * dim / 3)
    for multiple_of in (2**k for k in range(12, -1, -1)):
        if ffn_dim % multiple_of:
            continue
        candidates = [None] + [
            round(ffn_dim / base + step / 10**digits, digits) for digits in range(1, 5) for step in (0, -1, 1)
        ]
        for multiplier in candidates:
            if ffn_dim_from_meta(dim, multiple_of, multiplier) == ffn_dim:
                return multiple_of, multiplier
    raise HarnessError(
        f"{source}: intermediate_size {ffn_dim} cannot be written as Meta's multiple_of and "
        f"ffn_dim_multiplier (of at most 4 decimals) for hidden_size {dim}"
    )


def _original_ffn_params(ckpt: Checkpoint) -> ModelConfig:
    """An HF directory's original/params.json, when it gives the same FFN width: its multiple_of/ffn_dim_multiplier."""
    config, original = ckpt.config, ckpt.path / "original" / "params.json"
    if ckpt.format != "hf" or not original.is_file():
        return config
    kept = config_from_params_json(original)
    if (kept.dim, kept.ffn_dim) != (config.dim, config.ffn_dim):
        return config  # another model's params.json: the width is found from intermediate_size instead
    return dataclasses.replace(config, multiple_of=kept.multiple_of, ffn_dim_multiplier=kept.ffn_dim_multiplier)


def write_params(ckpt: Checkpoint, path: Path) -> None:
    """Meta's params.json, byte for byte when the source has one that describes this model; else written anew."""
    kept = ckpt.path / ("params.json" if ckpt.format == "meta" else "original/params.json")
    if kept.is_file():
        if ckpt.format == "meta" or _same_model(config_from_params_json(kept), ckpt.config):
            shutil.copyfile(kept, path)
            return
    params = meta_params(_original_ffn_params(ckpt), ckpt.path / "config.json")
    path.write_text(json.dumps(params, indent=2) + "\n")


def _same_model(meta: ModelConfig, hf: ModelConfig) -> bool:
    """Whether params.json describes the config.json's model (HF has no multiple_of/ffn_dim_multiplier; Meta no tie)."""
    ignored = dict(multiple_of=None, ffn_dim_multiplier=None, tie_word_embeddings=False)
    return dataclasses.replace(meta, **ignored) == dataclasses.replace(hf, **ignored)


def write_meta(ckpt: Checkpoint, out: Path) -> None:
    write_params(ckpt, out / "params.json")
    state_dict = {name: ckpt.tensor(name).contiguous() for name in ckpt.names()}  # output.weight even when tied
    torch.save(state_dict, out / "consolidated.00.pth")
    if ckpt.tokenizer_path.suffix == ".json":
        write_tokenizer_model(read_ranks(ckpt.tokenizer_path), out / "tokenizer.model")
    else:
        shutil.copyfile(ckpt.tokenizer_path, out / "tokenizer.model")
