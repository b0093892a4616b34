"""harness/adapter.py: the layout transforms, taps, the Llama tap table, errors naming the path, and an `Adapter`'s
hooks living for one run only; the Hugging Face reference (harness/reference.py) is the Adapter these tests drive."""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch

import harness
from harness import names, reference
from harness.adapter import (
    Adapter,
    drop_batch,
    heads_first,
    input_of,
    interleave_halves,
    kv_to_query_heads,
    llama_taps,
    output_of,
    split_heads,
    submodule,
)
from harness.checkpoint import open_checkpoint
from harness.errors import HarnessError
from harness.hf_layout import permute_to_hf
from harness.verify import verify
from tests.helpers import assert_expected

# The config fields the transforms read: 2 query heads (head_dim 4, two rotation pairs each) over 1 KV head
CONFIG = SimpleNamespace(n_layers=1, n_heads=2, n_kv_heads=1, n_rep=2)
T = 3


# ---- the layout transforms ------------------------------------------------------------------------------------------


def test_drop_batch_takes_the_one_sequence_and_refuses_a_batch():
    x = torch.arange(2 * T * 8.0).view(2, T, 8)
    assert_expected(drop_batch(x[:1], CONFIG), x[0])
    with pytest.raises(HarnessError, match=r"adapter: drop_batch expects a batch of 1, got shape \[2, 3, 8\]"):
        drop_batch(x, CONFIG)


@pytest.mark.parametrize("count, n", [("n_heads", 2), ("n_kv_heads", 1)])
def test_split_heads_is_a_view_per_head(count, n):
    x = torch.arange(T * n * 4.0).view(T, n * 4)  # [T, n * hd]
    split = split_heads(count)
    assert split.__name__ == f"split_heads({count!r})"
    heads = split(x, CONFIG)  # [n, T, hd]
    assert heads.shape == (n, T, 4)
    for h in range(n):
        assert_expected(heads[h], x[:, 4 * h : 4 * (h + 1)], what=f"head {h}")


def test_heads_first_swaps_tokens_and_heads():
    x = torch.arange(T * 2 * 4.0).view(T, 2, 4)  # [T, H, hd]
    assert_expected(heads_first(x, CONFIG), x.permute(1, 0, 2))


def test_interleave_halves_undoes_the_rotate_half_permutation():
    """q projected with HF's permuted rows (harness/hf_layout.py), split per head, comes back as Meta's q exactly."""
    x = torch.randn(T, 8, dtype=torch.float64)  # [T, dim]
    wq = torch.eye(8, dtype=torch.float64)  # Meta's rows; the identity keeps every value exact
    meta = split_heads()(x @ wq.T, CONFIG)  # [H, T, hd]
    hf = split_heads()(x @ permute_to_hf(wq, CONFIG.n_heads).T, CONFIG)
    assert not torch.equal(hf, meta)
    assert_expected(interleave_halves(hf, CONFIG), meta)


def test_kv_to_query_heads_gives_each_query_head_its_kv_head():
    config = SimpleNamespace(n_heads=6, n_kv_heads=2, n_rep=3)
    kv = torch.arange(2 * T * 4.0).view(2, T, 4)  # [KV, T, hd]
    heads = kv_to_query_heads(kv, config)  # [H, T, hd]
    assert heads.shape == (6, T, 4)
    for h in range(6):
        assert_expected(heads[h], kv[h // 3], what=f"query head {h}")


# ---- taps -----------------------------------------------------------------------------------------------------------


def test_a_tap_index_path_reaches_into_nested_tuples():
    """`index=(1, 0)`: the keys of a module returning (x, (keys, values)), as llms-from-scratch's KV-cache attention
    does; an int index still picks from a tuple and leaves a single tensor as it is."""
    x, keys, values = torch.zeros(2), torch.ones(2), torch.full((2,), 2.0)
    assert output_of("att", index=(1, 0)).value((), (x, (keys, values)), None).equal(keys)
    assert output_of("att", index=(1, 1)).value((), (x, (keys, values)), None).equal(values)
    assert output_of("att", index=1).value((), (x, keys), None).equal(keys)
    assert output_of("att", index=1).value((), x, None).equal(x)


def test_a_tap_applies_its_transforms_in_order_to_the_input_or_output():
    x = torch.arange(T * 8.0).view(1, T, 8)  # [1, T, H * hd]
    tap = input_of("layers.{layer}.attention.wo", drop_batch, split_heads("n_heads"), index=0)
    assert not tap.is_function and output_of("pkg.module:rotate").is_function
    assert_expected(tap.value((x,), None, CONFIG), x[0].view(T, 2, 4).transpose(0, 1))
    assert_expected(output_of("norm", drop_batch).value((x,), 2 * x, CONFIG), 2 * x[0])


def test_llama_taps_map_every_module_name_and_leave_the_rest_to_function_taps():
    """Modules give every canonical name but the rotated q/k, scores and probs (function taps add those) and tokens
    and logits (the harness records them); Meta's module paths by default, q/k mapped back from HF's half split."""
    taps = llama_taps()
    by_module = {n for n in names.canonical_names(1, 1) if n not in ("tokens", "logits")}
    by_module -= {f"layers.0.attention.heads.0.{p}" for p in ("q_rotated", "k_rotated", "scores", "probs")}
    assert {name.format(layer=0, head=0) for name in taps} == by_module
    assert taps["layers.{layer}.attention.heads.{head}.q"].target == "layers.{layer}.attention.wq"
    assert interleave_halves not in taps["layers.{layer}.attention.heads.{head}.q"].transforms
    hf = llama_taps({"layers": "model.layers.{layer}", "wq": "self_attn.q_proj"}, half_split=True)
    q = hf["layers.{layer}.attention.heads.{head}.q"]
    assert q.target == "model.layers.{layer}.self_attn.q_proj" and q.transforms[-1] is interleave_halves
    assert hf["layers.{layer}.ffn_norm"].target == "model.layers.{layer}.ffn_norm"  # a key not given: Meta's name


# ---- errors name what is missing ------------------------------------------------------------------------------------


def test_a_missing_submodule_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert submodule(model, "0") is model[0] and submodule(model, "") is model
    with pytest.raises(HarnessError, match=r"adapter: the module has no submodule 'layers.3' \(see print\(model\)"):
        submodule(model, "layers.3")


def _linear_adapter(taps) -> Adapter:
    """An Adapter over one Linear(8, 8) as its single 'layer' and its 'final norm'."""
    return Adapter(build=lambda c, d, dev: torch.nn.Linear(8, 8), taps=taps, layers="", final_norm="")


@pytest.mark.parametrize(
    "target, message",
    [
        ("no_such_module_xyz:f", "adapter: cannot import 'no_such_module_xyz' for the tap 'no_such_module_xyz:f'"),
        ("torch:no_such_function", "adapter: torch has no function 'no_such_function' (tap 'torch:no_such_function')"),
    ],
)
def test_a_function_tap_that_cannot_be_found_is_named(target, message):
    adapter = _linear_adapter({"norm": output_of(target)})
    with pytest.raises(HarnessError, match=re.escape(message)):
        with adapter.attached(torch.nn.Linear(8, 8), CONFIG):
            pass


def test_a_per_head_name_needs_one_entry_per_query_head():
    adapter = _linear_adapter({"layers.{layer}.attention.heads.{head}.q": output_of("")})  # [T, 8]: not [H, ...]
    model = torch.nn.Linear(8, 8)
    with adapter.attached(model, CONFIG):
        with pytest.raises(HarnessError, match=r"should give one entry per query head \(2\), got shape \[3, 8\]"):
            model(torch.zeros(T, 8))
    assert not model._forward_hooks and not model._forward_pre_hooks, "hooks left after the block"


# ---- the Hugging Face reference as an Adapter -----------------------------------------------------------------------


def test_adapter_hooks_live_only_for_the_run(tiny_checkpoint, tmp_path):
    """One run records every canonical name but tokens and logits (the harness's), in forward order; afterwards no hook
    is left on any module and no tapped function is left wrapped."""
    ckpt = open_checkpoint(tiny_checkpoint("3.0"))
    model = reference.build_model(ckpt, torch.float32)
    adapter = dataclasses.replace(reference.HUGGING_FACE, build=lambda c, d, dev: model)
    with harness.tracing(tmp_path / "t.h5"):
        logits = adapter(ckpt, torch.tensor([1, 2, 3]), dtype=torch.float32, device="cpu")
    assert logits.shape == (3, ckpt.config.vocab_size)
    hooked = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooked and reference.attention_scores.__name__ == "attention_scores"
    c = ckpt.config
    recorded = [n for n in names.canonical_names(c.n_layers, c.n_heads) if n not in ("tokens", "logits")]
    assert harness.load_trace(tmp_path / "t.h5").names == recorded


@pytest.mark.slow
def test_the_hugging_face_adapter_as_a_users_module(tiny_checkpoint, tmp_path):
    """An Adapter is an implementation like any other: HF's own, named as MODULE:ATTR, passes end to end and isolated
    (its layers' inputs replaced by a forward pre-hook), every name but tokens compared."""
    c = open_checkpoint(tiny_checkpoint("3.2")).config
    compared = [n for n in names.canonical_names(c.n_layers, c.n_heads) if n != "tokens"]
    for isolated in (False, True):
        result = verify(
            tiny_checkpoint("3.2"),
            out=tmp_path / f"v{isolated}",
            dtype="bfloat16",
            isolated=isolated,
            impl="harness.reference:HUGGING_FACE",
        )
        assert result.passed, result.comparison.first_divergence
        assert sorted(r.name for r in result.comparison.results) == sorted(compared)


@pytest.mark.slow
def test_a_wrong_adapter_fails_at_q(tiny_checkpoint, tmp_path, monkeypatch):
    """Hugging Face's q rows left in their half-split order (the adapter forgets `interleave_halves`): caught at `q`."""
    taps = dict(reference.HF_TAPS)
    q = taps["layers.{layer}.attention.heads.{head}.q"]
    taps["layers.{layer}.attention.heads.{head}.q"] = dataclasses.replace(q, transforms=q.transforms[:-1])
    monkeypatch.setattr(reference, "WRONG", dataclasses.replace(reference.HUGGING_FACE, taps=taps), raising=False)
    result = verify(tiny_checkpoint("3.0"), out=tmp_path / "v", dtype="float32", impl="harness.reference:WRONG")
    assert result.comparison.first_divergence == "layers.0.attention.heads.0.q"
