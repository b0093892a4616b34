"""Reading Meta checkpoints: shard merging, variants, tied embeddings, shape checks against the config."""

import shutil
from pathlib import Path

import pytest
import torch

from harness.checkpoint import load_pth, open_checkpoint
from harness.errors import HarnessError
from tests.helpers_bad_input import (
    write_shards,  # Meta's split: dim 0 for wq/wk/wv/w1/w3/output/embeddings, 1 for wo/w2
)


@pytest.mark.parametrize("n_shards", [2, 4])
def test_shards_merge_to_the_same_tensors(tiny_checkpoint, tmp_path, n_shards):
    single = open_checkpoint(tiny_checkpoint("3.0"))
    sharded = open_checkpoint(write_shards(single.path, tmp_path / "sharded", n_shards))
    assert len(list(sharded.path.glob("consolidated.*.pth"))) == n_shards
    assert sharded.config == single.config
    for name in single.names():
        assert torch.equal(sharded.tensor(name), single.tensor(name)), name
    assert sharded.fingerprint() == single.fingerprint()


@pytest.mark.parametrize(
    "variant, tied, factor, n_rep",
    [("3.0", False, None, 4), ("3.1", False, 8.0, 4), ("3.2", True, 8.0, 3)],
)
def test_variants(tiny_checkpoint, variant, tied, factor, n_rep):
    config = open_checkpoint(tiny_checkpoint(variant)).config
    assert (config.tie_word_embeddings, config.rope_scaling_factor, config.n_rep) == (tied, factor, n_rep)
    assert config.rope_theta == 500000.0 and config.vocab_size == 768


def test_meta_tensors_are_bf16_with_metas_key_names(tiny_checkpoint):
    sd = load_pth(tiny_checkpoint("3.0") / "consolidated.00.pth")
    assert "layers.2.attention.wq.weight" in sd and "layers.0.feed_forward.w2.weight" in sd and "output.weight" in sd
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}


def test_tied_checkpoint_without_output_weight_uses_embeddings(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("3.2")
    dst = tmp_path / "untied"
    shutil.copytree(src, dst)
    sd = dict(load_pth(src / "consolidated.00.pth"))
    del sd["output.weight"]
    torch.save(sd, dst / "consolidated.00.pth")
    ckpt = open_checkpoint(dst)
    assert ckpt.config.tie_word_embeddings
    assert torch.equal(ckpt.tensor("output.weight"), ckpt.tensor("tok_embeddings.weight"))


def test_shape_mismatch_names_tensor_and_both_shapes(tiny_checkpoint, tmp_path):
    dst = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint("3.0"), dst)
    sd = dict(load_pth(tiny_checkpoint("3.0") / "consolidated.00.pth"))  # not dst's: it is rewritten below
    sd["layers.1.feed_forward.w3.weight"] = sd["layers.1.feed_forward.w3.weight"][:-32].clone()
    torch.save(sd, dst / "consolidated.00.pth")
    with pytest.raises(
        HarnessError, match=r"layers\.1\.feed_forward\.w3\.weight has shape \[416, 128\], config implies \[448, 128\]"
    ):
        open_checkpoint(dst)


def mapped_file(t: torch.Tensor) -> str | None:
    """The file whose memory mapping holds `t`'s data, from Linux's /proc/self/maps; None for anonymous memory (no
    path, or a pseudo-path such as [heap])."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)  # address range, permissions, offset, device, inode, path (if any)
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if start <= t.data_ptr() < end:
            path = fields[5].strip() if len(fields) == 6 else ""
            return path if path.startswith("/") else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's mappings from Linux's /proc")
def test_tensors_are_read_into_new_memory_not_mapped(tiny_checkpoint, tmp_path):
    """Each tensor is read when asked into new (anonymous) memory, never from a mapping of consolidated.00.pth (a
    mapping keeps every page it touched resident: a forward reading a layer at a time would grow with depth); shards
    are merged into new memory too."""
    ckpt = open_checkpoint(tiny_checkpoint("3.0"))
    a = ckpt.tensor("layers.0.attention.wq.weight")
    assert mapped_file(a) is None  # anonymous memory, not a mapping of consolidated.00.pth
    assert a.data_ptr() != ckpt.tensor("layers.0.attention.wq.weight").data_ptr()
    sharded = open_checkpoint(write_shards(ckpt.path, tmp_path / "sharded", 2))
    assert mapped_file(sharded.tensor("layers.0.attention.wq.weight")) is None
