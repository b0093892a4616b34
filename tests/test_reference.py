"""The Hugging Face reference against the from-scratch forward in float32: same names, same shapes, same numbers.

Measured here (printed with -s -n 0): over every name, float32 reference vs scratch differ by at most 2.8e-6 in
relative L2 (3.1, layers.2 per-head outputs; 3.0: 2.1e-6, 3.2: 2.2e-6, identical for Meta and HF directories) and
by at most 7.0e-6 of a tensor's largest magnitude elementwise. The bounds below sit ~3x above those.
"""

import dataclasses

import pytest
import torch

from harness import adapter, hf_layout, load_trace, names, reference, scratch, weights
from harness.checkpoint import open_checkpoint
from harness.compare import rel_l2
from harness.reference import build_model
from harness.run import trace_reference, trace_scratch
from tests.helpers import assert_expected

CASES = [(v, f) for v in ("3.0", "3.1", "3.2") for f in ("meta", "hf")]
REL_L2 = 1e-5  # compare.py's float32 bound; measured worst 2.8e-6
OF_MAX = 2e-5  # elementwise, as a fraction of the reference tensor's largest magnitude; measured worst 7.0e-6


def assert_agrees(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    """`got` within float32 rounding of `want`; returns their relative L2 error."""
    got, want = got.double(), want.double()
    err = rel_l2(got, want)
    torch.testing.assert_close(
        got, want, rtol=0, atol=OF_MAX * float(want.abs().max()), msg=lambda m: f"{name}: relative L2 {err:.2e}; {m}"
    )
    assert err <= REL_L2, (
        f"{name}: relative L2 error {err:.2e} > {REL_L2:.0e} between the float32 reference and scratch"
    )
    return err


@pytest.mark.parametrize("variant, fmt", CASES)
def test_reference_matches_scratch_within_float32_rounding(tiny_checkpoint, traced_pair, variant, fmt):
    c = open_checkpoint(tiny_checkpoint(variant, fmt)).config
    ref, mine = (load_trace(p) for p in traced_pair(variant, "float32", oracle=False, fmt=fmt))
    assert ref.names == mine.names == list(names.canonical_names(c.n_layers, c.n_heads))
    assert ref.attrs["implementation"] == "reference" and ref.tokens == mine.tokens
    worst, where = 0.0, None
    for name in ref.names[1:]:  # after "tokens"
        assert ref.shape(name) == mine.shape(name), f"{name}: reference {ref.shape(name)}, scratch {mine.shape(name)}"
        err = assert_agrees(name, mine[name], ref[name])
        if err > worst:
            worst, where = err, name
    print(f"tiny {variant} {fmt}: largest relative L2 error {worst:.2e} at {where}")


@pytest.mark.parametrize("variant", ["3.0", "3.2"])
def test_built_from_meta_is_the_model_from_pretrained_gives(tiny_checkpoint, tmp_path, variant):
    """The model read a projection at a time (from a Meta or an HF directory alike) is bit-identical to the one
    from_pretrained loads whole: the same modules, the same weights, the same order."""
    from transformers import LlamaForCausalLM

    for fmt in ("meta", "hf"):
        trace_reference(
            open_checkpoint(tiny_checkpoint(variant, fmt)), tmp_path / f"{fmt}.h5", dtype="bfloat16", oracle=False
        )
    a, b = load_trace(tmp_path / "meta.h5"), load_trace(tmp_path / "hf.h5")
    assert a.names == b.names
    for name in a.names:
        assert torch.equal(a[name], b[name]), name
    path = tiny_checkpoint(variant, "hf")
    whole = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation=reference.ATTENTION)
    with torch.inference_mode():
        logits = whole(torch.tensor(a.tokens)[None], use_cache=False).logits[0]
    assert torch.equal(logits.float(), a["logits"])


def test_the_model_holds_no_projection_weights(tiny_checkpoint):
    """Built on the meta device, each projection reads its weight when it runs and drops it after, so that one
    projection's weights are resident at a time; only the norms are loaded (docs/any-size.md)."""
    ckpt = open_checkpoint(tiny_checkpoint("3.2"))
    model = build_model(ckpt, torch.bfloat16)
    loaded = [name for name, _ in model.named_parameters()]
    assert len(loaded) == 2 * ckpt.config.n_layers + 1 and all(name.endswith("norm.weight") for name in loaded)
    assert isinstance(model.model.layers[0].mlp.down_proj, weights.ReadLinear)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    x = torch.randn(1, 5, ckpt.config.dim).to(torch.bfloat16)
    want = torch.nn.functional.linear(x, weights.hf_tensor(ckpt, "layers.0.attention.wq.weight", torch.bfloat16))
    assert torch.equal(model.model.layers[0].self_attn.q_proj(x), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_projection_read_by_blocks_of_rows_is_the_whole_one(tiny_checkpoint, monkeypatch, dtype):
    """Past BLOCK_BYTES a projection is applied a block of rows (output features) at a time; q/k in whole heads (their
    rows are permuted within each for HF's rotate_half), within rounding. Blocks of 1 KiB: wq [128, 128] one head
    (16 rows) at a time, w2 [128, 448] one row at a time."""
    monkeypatch.setattr(weights, "BLOCK_BYTES", 1024)
    for fmt in ("meta", "hf"):
        ckpt = open_checkpoint(tiny_checkpoint("3.0", fmt))
        for name in ("layers.1.attention.wq.weight", "layers.1.feed_forward.w2.weight"):
            linear = weights.ReadLinear(ckpt, name, dtype, "cpu")
            assert linear.rows < ckpt.shape(name)[0]
            x = torch.randn(7, ckpt.shape(name)[1]).to(dtype)
            want = torch.nn.functional.linear(x, weights.hf_tensor(ckpt, name, dtype))
            # blocks of other sizes may sum in another order: 1 element of 896 off by 1.2e-7 (of outputs up to ~3) seen
            unit = 2**-52 if dtype == torch.float64 else 2**-8
            assert_expected(linear(x), want, rtol=0, atol=4 * unit * float(want.abs().max()))


@pytest.mark.slow
def test_reference_trace_holds_a_float64_oracle(tiny_checkpoint, tmp_path):
    ckpt = open_checkpoint(tiny_checkpoint("3.0"))
    trace_reference(ckpt, tmp_path / "r.h5", dtype="bfloat16")
    trace = load_trace(tmp_path / "r.h5")
    assert sorted(trace.extra_names) == sorted("_oracle." + n for n in trace.names if n != "tokens")
    assert trace.dtype("_oracle.layers.1.attention.heads.5.probs") == "float64"
    assert trace.dtype("layers.1.attention.heads.5.probs") == "bfloat16"
    assert trace.attrs["oracle"].startswith("float64")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["3.1", "3.2"])
def test_the_oracle_is_float64_exact(tiny_checkpoint, tmp_path, monkeypatch, variant):
    """The oracle against the float64 scratch forward given HF's own frequencies: float64 rounding apart (measured
    4e-15; with the harness's float64 frequencies instead ~2e-7, HF's inv_freq being float32). Had the oracle kept HF's
    float32 RMSNorm, RoPE angles or softmax, this would be ~1e-6."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    ckpt = open_checkpoint(tiny_checkpoint(variant))
    inv_freq = LlamaRotaryEmbedding(config=hf_layout.hf_config(ckpt.config)).inv_freq.double()
    monkeypatch.setattr(scratch, "rope_frequencies", lambda config: inv_freq)
    trace_reference(ckpt, tmp_path / "r.h5", dtype="float32")
    trace_scratch(ckpt, tmp_path / "s.h5", dtype="float64")
    ref, mine = load_trace(tmp_path / "r.h5"), load_trace(tmp_path / "s.h5")
    for name in mine.names[1:]:
        torch.testing.assert_close(
            ref["_oracle." + name], mine[name], rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}"
        )


@pytest.mark.slow
def test_name_globs_filter_the_oracle_too(tiny_checkpoint, tmp_path):
    ckpt = open_checkpoint(tiny_checkpoint("3.0"))
    trace_reference(ckpt, tmp_path / "r.h5", dtype="bfloat16", names=["layers.1.attention.heads.5.*", "logits"])
    trace = load_trace(tmp_path / "r.h5")
    assert len(trace.names) == 10 and sorted(trace.extra_names) == sorted("_oracle." + n for n in trace.names[1:])


def _first_divergence(tmp_path, ckpt_for_reference, ckpt) -> str | None:
    trace_reference(ckpt_for_reference, tmp_path / "ref.h5", dtype="float32", oracle=False)
    trace_scratch(ckpt, tmp_path / "scratch.h5", dtype="float32")
    ref, mine = load_trace(tmp_path / "ref.h5"), load_trace(tmp_path / "scratch.h5")
    return next((n for n in ref.names[1:] if rel_l2(mine[n].double(), ref[n].double()) > REL_L2), None)


def test_a_wrong_q_k_permutation_is_caught(tiny_checkpoint, tmp_path, monkeypatch):
    ckpt = open_checkpoint(tiny_checkpoint("3.0"))
    monkeypatch.setattr(hf_layout, "permute_to_hf", lambda w, n: w)  # Meta's rows handed to rotate_half as they are
    assert _first_divergence(tmp_path, ckpt, ckpt) == "layers.0.attention.heads.0.q"


def test_a_missing_rope_scaling_is_caught(tiny_checkpoint, tmp_path):
    ckpt = open_checkpoint(tiny_checkpoint("3.1"))
    unscaled = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, rope_scaling=None))
    assert _first_divergence(tmp_path, unscaled, ckpt) == "layers.0.attention.heads.0.q_rotated"


def test_a_wrong_gqa_mapping_in_scratch_is_caught(tiny_checkpoint, tmp_path, monkeypatch):
    ckpt = open_checkpoint(tiny_checkpoint("3.2"))  # 3 query heads per KV head
    monkeypatch.setattr(scratch, "kv_head_of", lambda head, config: head % config.n_kv_heads)
    assert _first_divergence(tmp_path, ckpt, ckpt) == "layers.0.attention.heads.1.k"


def test_a_wrong_gqa_mapping_in_the_reference_is_caught(tiny_checkpoint, tmp_path, monkeypatch):
    """An adapter whose k/v map query head h to KV head h % n_kv (instead of h // n_rep) fails at head 1's k."""
    ckpt = open_checkpoint(tiny_checkpoint("3.2"))

    def modulo(x, config):  # [KV, T, hd] -> [H, T, hd], the wrong way round
        return x[[h % config.n_kv_heads for h in range(config.n_heads)]]

    taps = {
        name: dataclasses.replace(
            tap, transforms=tuple(modulo if t is adapter.kv_to_query_heads else t for t in tap.transforms)
        )
        for name, tap in reference.HF_TAPS.items()
    }
    monkeypatch.setattr(reference, "HUGGING_FACE", dataclasses.replace(reference.HUGGING_FACE, taps=taps))
    assert _first_divergence(tmp_path, ckpt, ckpt) == "layers.0.attention.heads.1.k"
