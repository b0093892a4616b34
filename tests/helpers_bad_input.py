"""Helpers for the refusal tests (tests/test_bad_input.py, test_implementations.py, test_cli.py): run the CLI and check
its one-line refusal, snapshot a folder, and spoil a tiny checkpoint in one way."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from harness import hf_layout
from harness.checkpoint import load_pth, open_checkpoint, split_dim
from harness.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m harness ARGS` in a fresh process, as a user runs it."""
    cmd = [sys.executable, "-m", "harness", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def cli(capsys, *argv) -> tuple[int, str, str]:
    """`harness.cli.main(argv)` in this process (fast; `run_cli` runs the real one) -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, err: str, *fragments: str) -> None:
    """Exit 2, exactly one line on stderr, no traceback, and the line names every fragment."""
    assert code == 2, f"exit code {code}, expected 2; stderr:\n{err}"
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, f"expected one line on stderr, got:\n{err}"
    for fragment in fragments:
        assert str(fragment) in err, f"{fragment!r} not in stderr: {err!r}"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) -> sha256 of its bytes; folders -> 'dir'."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, drop: tuple[str, ...] = (), **changes) -> None:
    data = json.loads(path.read_text())
    for key in drop:
        del data[key]
    data.update(changes)
    path.write_text(json.dumps(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def write_shards(src: Path, dst: Path, n: int) -> Path:
    """`src`'s consolidated.00.pth as `n` model-parallel shards in `dst`, split along Meta's split dims."""
    dst.mkdir()
    for f in ("params.json", "tokenizer.model"):
        shutil.copy(src / f, dst / f)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, t in load_pth(src / "consolidated.00.pth").items():
        dim = split_dim(name)
        parts = [t] * n if dim is None else t.chunk(n, dim=dim)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, dst / f"consolidated.{i:02d}.pth")
    return dst


def rewrite_shard(path: Path, **tensors: torch.Tensor | None) -> None:
    """Replace (or, with None, delete) tensors of one shard; keyword names use '__' for '.'."""
    sd = dict(load_pth(path))
    sd = {k: v.clone() for k, v in sd.items()}  # detach from the file's mmap before overwriting it
    for key, value in tensors.items():
        name = key.replace("__", ".")
        if value is None:
            del sd[name]
        else:
            sd[name] = value
    torch.save(sd, path)


def write_hf_checkpoint(meta: Path, dst: Path) -> Path:
    """A minimal Hugging Face directory (config.json + model.safetensors + tokenizer.model) of a Meta checkpoint.

    Written here, not with convert.py, so these tests do not wait on it: names and q/k permutation from hf_layout.
    """
    from safetensors.torch import save_file

    ckpt = open_checkpoint(meta)
    c = ckpt.config
    tensors = {}
    for name in ckpt.names():
        t = ckpt.tensor(name)
        if heads := hf_layout.heads_of(name):
            t = hf_layout.permute_to_hf(t, getattr(c, heads))
        tensors[hf_layout.meta_to_hf_name(name)] = t.contiguous()
    dst.mkdir()
    save_file(tensors, dst / "model.safetensors")
    config = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=c.dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        vocab_size=c.vocab_size,
        intermediate_size=c.ffn_dim,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        max_position_embeddings=c.max_seq_len,
        tie_word_embeddings=c.tie_word_embeddings,
    )
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(meta / "tokenizer.model", dst / "tokenizer.model")
    return dst
