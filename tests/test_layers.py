"""Any size (issue 19): checkpoints read a row block at a time, and `verify --layers A:B`, which judges decoder layers
A .. B-1 alone, isolated, with the float64 oracle and the implementation over the range only (docs/any-size.md).

Done when a range verify of a tiny model places a bug where the whole model's isolated verify places it: a mutant in
layer 2 of the 3-layer tiny 3.0, found at the same name both ways.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from harness import load_trace, scratch
from harness.checkpoint import open_checkpoint
from harness.cli import main
from harness.config import rope_frequencies
from harness.errors import HarnessError
from harness.reference import build_model
from harness.run import make_run, trace_scratch
from harness.verify import verify
from tests.helpers import assert_expected
from tests.helpers_bad_input import write_shards
from tests.test_suite import unseen_checkpoint

pytest_plugins = ["pytester"]
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "my_llama.py"  # uses layer_input, not skip_layer


# ---- reading a checkpoint a block of rows at a time ---------------------------------------------------------------


@pytest.mark.parametrize("fmt, shards", [("meta", 1), ("meta", 2), ("hf", 1)])
def test_rows_and_take_read_what_the_whole_tensor_holds(tiny_checkpoint, tmp_path, fmt, shards):
    """A block of rows (split on dim 0 or 1 across shards, q/k of an HF checkpoint in whole heads) and an embedding
    lookup read only those rows, and equal the whole tensor's."""
    ckpt = open_checkpoint(tiny_checkpoint("3.0", fmt))
    if shards > 1:
        ckpt = open_checkpoint(write_shards(ckpt.path, tmp_path / "sharded", shards))
    hd = ckpt.config.head_dim
    for name, start, stop in [
        ("output.weight", 100, 700),  # the second shard starts at row 384
        ("layers.1.attention.wq.weight", hd, 3 * hd),  # permuted within each head in an HF checkpoint
        ("layers.1.feed_forward.w2.weight", 5, 9),  # split on dim 1 across shards
        ("layers.1.ffn_norm.weight", 0, ckpt.config.dim),  # replicated
    ]:
        assert_expected(ckpt.rows(name, start, stop), ckpt.tensor(name)[start:stop], what=name)
    ids = torch.tensor([5, 700, 5, 383, 384])
    assert_expected(ckpt.take("tok_embeddings.weight", ids), ckpt.tensor("tok_embeddings.weight")[ids])
    with pytest.raises(HarnessError, match="split a head") if fmt == "hf" else contextlib.nullcontext():
        ckpt.rows("layers.1.attention.wk.weight", 1, 5)
    with pytest.raises(HarnessError, match="token ids 3..768 outside tok_embeddings.weight's 768 rows"):
        ckpt.take("tok_embeddings.weight", torch.tensor([3, 768]))


# ---- the range's inputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers, message",
    [
        ("2:5", "--layers 2:5: outside the model's 3 layers; A:B with 0 <= A < B <= 3 (0:3: all of them)"),
        ("2:2", "--layers 2:2: outside the model's 3 layers"),
        ("1-2", "--layers 1-2: expected A:B, the decoder layers A .. B-1 (e.g. 0:3: all)"),
    ],
)
def test_a_range_outside_the_model_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys, layers, message):
    ckpt = str(tiny_checkpoint("3.0"))
    for command in (["verify", ckpt, "--out", str(tmp_path / "v")], ["trace", ckpt, "--out", str(tmp_path / "t.h5")]):
        assert main([*command, "--layers", layers]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir()), "refused before any work"


def test_a_range_with_generation_or_name_globs_is_refused(tiny_checkpoint):
    with pytest.raises(HarnessError, match="^--layers with --generate: a layer range covers one forward pass"):
        make_run(tiny_checkpoint("3.0"), layers="1:2", generate=2, isolated=True)
    with pytest.raises(HarnessError, match="^--layers with --names"):
        make_run(tiny_checkpoint("3.0"), layers="1:2", names=["layers.1.*"])


def test_a_traced_range_keeps_its_names_and_ends_the_forward_after_it(tiny_checkpoint, tmp_path):
    """Not isolated (`trace`), the forward runs from the embeddings but keeps only the range's names, and ends at
    layer_input(B): no logits unless the range reaches the end; the embeddings only from layer 0."""
    ckpt = open_checkpoint(tiny_checkpoint("3.0"))
    assert trace_scratch(ckpt, tmp_path / "mid.h5", layers="1:2") is None
    mid = load_trace(tmp_path / "mid.h5")
    assert len(mid.names) > 1 and all(name.startswith("layers.1.") for name in mid.names[1:])
    assert list(mid.attrs["layers"]) == [1, 2]
    logits = trace_scratch(ckpt, tmp_path / "end.h5", layers=(2, 3))
    whole = trace_scratch(ckpt, tmp_path / "whole.h5")
    end = load_trace(tmp_path / "end.h5")
    assert end.names[-2:] == ["norm", "logits"] and "embeddings" not in end.names
    assert_expected(logits, whole)  # the same forward, only fewer names kept
    assert trace_scratch(ckpt, tmp_path / "first.h5", layers="0:1") is None
    assert load_trace(tmp_path / "first.h5").names[:2] == ["tokens", "embeddings"]


# ---- verdicts --------------------------------------------------------------------------------------------------------


def _rope_theta_in_layer(buggy: int):
    """scratch.attention with Llama 2's rope_theta (10000) in one layer only: the bug sits at that layer's q_rotated."""
    original = scratch.attention

    def attention(layer, x_norm, weights, config, freqs_cis, mask, **cache):
        if layer == buggy:
            wrong = rope_frequencies(dataclasses.replace(config, rope_theta=10000.0)).to(freqs_cis.real.dtype)
            angles = torch.outer(torch.arange(x_norm.shape[0], dtype=wrong.dtype), wrong)  # [T, hd/2]
            freqs_cis = torch.polar(torch.ones_like(angles), angles).to(freqs_cis.device)
        return original(layer, x_norm, weights, config, freqs_cis, mask, **cache)

    return attention


def _verdict(result) -> tuple[bool, str | None]:
    return result.passed, result.comparison.first_divergence


@pytest.mark.slow
def test_a_bug_in_layer_2_is_placed_at_the_same_name_by_a_range_and_by_the_whole_model(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """The issue's test of done: `--layers 2:3` and `--isolated` agree on the verdict and the first divergence;
    `--layers 0:3` is `--isolated` itself, result for result; a range without the bug passes."""
    ckpt = tiny_checkpoint("3.0")
    monkeypatch.setattr(scratch, "attention", _rope_theta_in_layer(2))
    whole = verify(ckpt, out=tmp_path / "whole", dtype="bfloat16", isolated=True)
    ranged = verify(ckpt, out=tmp_path / "range", dtype="bfloat16", layers="2:3")
    assert _verdict(whole) == _verdict(ranged) == (False, "layers.2.attention.heads.0.q_rotated")
    every = verify(ckpt, out=tmp_path / "every", dtype="bfloat16", layers="0:3")
    assert [dataclasses.asdict(r) for r in every.comparison.results] == [
        dataclasses.asdict(r) for r in whole.comparison.results
    ]
    before = verify(ckpt, out=tmp_path / "before", dtype="bfloat16", layers="0:2")
    assert _verdict(before) == (True, None) and before.reference_token is None
    assert {r.layer for r in before.comparison.results} == {None, 0, 1}


@pytest.mark.slow
@pytest.mark.parametrize("impl", [str(EXAMPLE) + ":forward", "harness.reference:HUGGING_FACE"])
def test_a_range_passes_a_function_that_does_not_skip_and_an_adapter(tiny_checkpoint, tmp_path, impl):
    """examples/my_llama.py never asks skip_layer: it computes layer 0, unrecorded, and is stopped after layer 1. The
    reference's own Adapter skips layer 0 (its build asks) and is stopped the same way."""
    result = verify(tiny_checkpoint("3.1"), out=tmp_path / "v", dtype="bfloat16", layers="1:2", impl=impl)
    assert _verdict(result) == (True, None)
    names = [r.name for r in result.comparison.results]
    assert names and all(name.startswith("layers.1.") for name in names)
    assert result.comparison.only_in_a == ["layers.0.output"]  # the reference's input to layer 1, for isolation


@pytest.mark.slow
def test_the_range_oracle_starts_from_the_references_input(tiny_checkpoint, tmp_path):
    """The reference of `--layers 1:3` holds the oracle of layers 1 and 2, the final norm and the logits only (not the
    embeddings', not layer 0's), and HF's output of layer 0 without one: the input isolated mode gives layer 1."""
    result = verify(tiny_checkpoint("3.0"), out=tmp_path / "v", dtype="bfloat16", layers="1:3")
    with load_trace(tmp_path / "v" / "reference.h5") as ref:
        oracle = [n.removeprefix("_oracle.") for n in ref.extra_names if n.startswith("_oracle.")]
        assert oracle == [n for n in ref.names[1:] if n != "layers.0.output"]
        assert {n.split(".")[1] for n in oracle if n.startswith("layers.")} == {"1", "2"}
        assert "norm" in oracle and "logits" in oracle and "embeddings" not in ref.names
    assert result.passed and result.reference_token == result.implementation_token


@pytest.mark.slow
def test_the_plugin_tests_the_layers_of_its_range(pytester, tmp_path):
    """`--llama3-layers 1:2` on a 2-layer checkpoint: the tests of layer 1 only, the embeddings' skipped, the final
    norm and logits tested (the range reaches the end)."""
    shutil.copy(EXAMPLE, pytester.path / "my_llama.py")
    args = ["--llama3-impl", "my_llama.py:forward", "--llama3-checkpoint", str(unseen_checkpoint(tmp_path))]
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", "0", "-rA", *args, "--llama3-layers", "1:2", "-k", "head3 or not head"
    )
    out = result.stdout.str()
    assert result.ret == 0 and "layer0-" not in out, out
    assert "PASSED ::test_head[layer1-head3-q_rotated]" in out and "PASSED ::test_logits" in out
    assert "SKIPPED" in out and "outside --llama3-layers 1:2 of 2 layers" in out  # test_embeddings


def test_the_adapter_that_loads_a_layer_when_it_runs_computes_the_reference(tiny_checkpoint):
    """docs/any-size.md's Adapter build (run from the page): a model built on the meta device, each layer's weights
    loaded by a pre-hook and freed by a hook, gives the reference's logits, and holds no layer after a forward."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "any-size.md").read_text()
    code = next(block for block in page.split("```python")[1:] if "def build(" in block).split("```")[0]
    namespace = {}
    exec(compile(code, "docs/any-size.md", "exec"), namespace)
    ckpt = open_checkpoint(tiny_checkpoint("3.2"))
    tokens = torch.tensor([[512, 5, 300, 12, 90]])
    with torch.inference_mode():
        model = namespace["build"](ckpt, torch.float32, "cpu")
        logits = model(tokens, use_cache=False).logits
        want = build_model(ckpt, torch.float32)(tokens, use_cache=False).logits  # eager attention; the page's SDPA
    assert_expected(logits, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    assert all(p.is_meta for p in model.model.layers.parameters())


def test_the_plugins_range_is_checked_against_each_case(tiny_checkpoint):
    """`--llama3-layers A:B` (LLAMA3_LAYERS) gives each case its range, checked against its model: one line when
    outside it, or with --llama3-generate."""
    from harness.suite_cases import read_options, suite_cases

    def cases(**given):
        return suite_cases(read_options(lambda name: given.get(name)))

    (case,) = cases(checkpoint=str(tiny_checkpoint("3.0")), layers="1:3")
    assert case.layers == (1, 3) and list(case.layer_indices) == [1, 2]
    assert all(c.layers == (0, 1) for c in cases(layers="0:1")) and len(cases(layers="0:1")) == 6
    with pytest.raises(HarnessError, match="^--layers 1:4: outside the model's 3 layers"):
        cases(layers="1:4")
    with pytest.raises(HarnessError, match="^--llama3-layers with --llama3-generate"):
        cases(layers="1:2", generate="2")
