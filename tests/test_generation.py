"""Generation: a prefill and decode steps with a KV cache, verified step by step (`steps.{s}.NAME`) against Hugging
Face.

The catalogue (tests/mutants.py, CACHE) holds the KV-cache bugs other projects' threads report, applied to the
scratch forward's cache functions; each must fail at its own step and name, in float32 and bfloat16. A bug that
changes a cached tensor's length fails as the harness's shape check (exit 2, naming the step's name and both shapes);
one that changes values, as the comparison's first divergence. The reference of each dtype is traced once (teacher
forcing feeds its greedy tokens to every mutant).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from harness import names, reference, scratch
from harness.checkpoint import open_checkpoint
from harness.cli import main
from harness.compare import compare_traces
from harness.generation import generated_tokens, trace_generation
from harness.implementation import builtin, decoder, resolve
from harness.run import make_run
from harness.trace_file import load_trace
from harness.verify import verify
from tests.helpers import GENERATION_STEPS, assert_passes, first_failure
from tests.mutants import CACHE

DTYPES = ("float32", "bfloat16")
STEPS = GENERATION_STEPS  # the decode steps of conftest.py's `generation_references`, the reference traced once
HEAD0 = "layers.0.attention.heads.0"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "my_llama.py"


# The catalogue of cache bugs: tests/mutants.py (CACHE), each replacing one cache function of harness/scratch.py.
CATALOGUE = CACHE


def XDIST_GROUP(item) -> str:
    return "generation"


# ---- the specification --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_unmutated_scratch_passes_every_step(generation_references, dtype, tmp_path):
    run, reference = generation_references[dtype]
    first, how = first_failure(run, reference, tmp_path / "scratch.h5")
    assert how == "comparison", how
    assert_passes(compare_traces(reference, tmp_path / "scratch.h5"), f"scratch {dtype}")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mutant", CATALOGUE, ids=[m.id for m in CATALOGUE])
def test_mutant_fails_at_its_step_and_name(generation_references, mutant, dtype, tmp_path, monkeypatch):
    run, reference = generation_references[dtype]
    mutant.apply(monkeypatch, run.checkpoint.config)
    first, how = first_failure(run, reference, tmp_path / "mutant.h5")
    assert first == mutant.first, f"{mutant.bug} ({dtype}): first failure {first} ({how}), expected {mutant.first}"


def test_step_names_are_step_major_in_forward_order():
    order = list(names.canonical_names(2, 2, steps=2))
    assert order == sorted(order, key=names.order_key)
    assert order[0] == "tokens" and order[1] == "steps.0.embeddings" and order[-1] == "steps.2.logits"
    assert names.order_key("steps.0.logits") < names.order_key("steps.1.embeddings")
    assert names.order_key("steps.1.layers.0.attention.heads.0.cache_k") < names.order_key(
        "steps.1.layers.0.attention.heads.0.scores"
    )
    assert names.split_step("steps.10.layers.3.ffn_norm") == (10, "layers.3.ffn_norm")
    assert names.parse("steps.2.layers.3.attention.heads.1.probs") == (3, 1, "probs")
    assert names.axes("steps.1.layers.0.attention.heads.0.scores") == ("T", "K")


@pytest.mark.slow
def test_step_shapes(generation_references):
    """Prefill: per-head q [P, hd], scores [P, P]; decode step s: q [1, hd], cache_k [P + s, hd], scores [1, P + s]."""
    run, reference = generation_references["float32"]
    P, hd = len(run.tokens), run.checkpoint.config.head_dim
    with load_trace(reference) as t:
        assert t.shape("tokens") == (P + STEPS,)
        assert t.shape(f"steps.0.{HEAD0}.q") == (P, hd) and t.shape(f"steps.0.{HEAD0}.scores") == (P, P)
        for s in range(1, STEPS + 1):
            assert t.shape(f"steps.{s}.{HEAD0}.q") == (1, hd)
            assert t.shape(f"steps.{s}.{HEAD0}.cache_k") == (P + s, hd)
            assert t.shape(f"steps.{s}.{HEAD0}.scores") == (1, P + s)
            assert t.shape(f"steps.{s}.logits") == (1, run.checkpoint.config.vocab_size)
        c = run.checkpoint.config
        assert set(t.names) == set(names.canonical_names(c.n_layers, c.n_heads, steps=STEPS))
        assert {n.removeprefix("_oracle.") for n in t.extra_names} == set(t.names) - {"tokens"} | {"_generated"}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["3.0", "3.1", "3.2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_verify_generate_passes_with_per_step_results(tiny_checkpoint, variant, dtype, tmp_path):
    result = verify(tiny_checkpoint(variant), out=tmp_path / "v", dtype=dtype, generate=2)
    data = json.loads((tmp_path / "v" / "comparison.json").read_text())
    steps = data["generation"]["per_step"]
    assert [s["step"] for s in steps] == [0, 1, 2] and all(s["names"] > 0 for s in steps)
    assert len(result.reference_generated) == 3 and not data["generation"]["unexplained_disagreements"]
    if dtype == "float32":
        assert result.reference_generated == result.implementation_generated
    assert (tmp_path / "v" / "steps.png").is_file() and "Per step" in (tmp_path / "v" / "report.html").read_text()
    assert_passes(None, f"{variant} {dtype}", result.comparison.results + result.cache_check)


@pytest.mark.slow
def test_cache_against_no_cache_catches_a_cache_only_bug(tiny_checkpoint, tmp_path, monkeypatch):
    """Positions restarting at 0 in decode steps: the no-cache forward (positions 0 .. P + N - 1) disagrees."""
    monkeypatch.setattr(
        scratch, "step_freqs_cis", lambda cfg, start, n, dt, dev: scratch.rope_freqs_cis(cfg, n, dt, dev)
    )
    result = verify(tiny_checkpoint("3.0"), out=tmp_path / "v", generate=2)
    assert not result.passed and not result.cache_passed
    assert [r.name for r in result.cache_check if not r.passed][0] == f"steps.1.{HEAD0}.q_rotated"


@pytest.mark.slow
def test_example_with_its_cache_passes_through_impl(tiny_checkpoint, tmp_path):
    results = {}
    for dtype in DTYPES:
        results[dtype] = verify(
            tiny_checkpoint("3.1"), out=tmp_path / dtype, dtype=dtype, impl=f"{EXAMPLE}:forward", generate=STEPS
        )
        assert (tmp_path / dtype / "implementation-nocache.h5").is_file()
        assert not json.loads((tmp_path / dtype / "comparison.json").read_text())["generation"][
            "unexplained_disagreements"
        ]
    everything = [r for d in DTYPES for r in results[d].comparison.results + results[d].cache_check]
    assert_passes(None, "examples/my_llama.py, both dtypes, against HF and against its no-cache forward", everything)


def test_trace_generate_cli(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "t.h5"
    assert main(["trace", str(tiny_checkpoint("3.0")), "--generate", "2", "--out", str(out)]) == 0
    assert "generated" in capsys.readouterr().out
    with load_trace(out) as t:
        assert f"steps.2.{HEAD0}.cache_v" in t and len(generated_tokens(t)) == 3


def _no_decode(checkpoint, tokens, *, dtype, device):
    return torch.zeros(len(tokens), checkpoint.config.vocab_size)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--generate", "-1"], "0 or more"),
        (["--generate", "2", "--isolated"], "--isolated with --generate"),
        pytest.param(["--generate", "2", "--impl", f"{__file__}:_no_decode"], "start_pos", marks=pytest.mark.slow),
    ],
)
def test_bad_generate_input_is_one_line_and_writes_nothing(tiny_checkpoint, tmp_path, capsys, args, message):
    out = tmp_path / "v"
    assert main(["verify", str(tiny_checkpoint("3.0")), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


# ---- the decode contract's `cache`: the implementation's own, nothing of the harness's -----------------------------


def test_a_functions_cache_holds_only_what_it_put_there(tiny_checkpoint, tmp_path):
    """The same dict at every step, empty at the prefill; the scratch forward keeps its per-layer keys and values."""
    seen = []

    def mine(checkpoint, tokens, *, dtype, device, start_pos=0, cache=None):
        seen.append((start_pos, id(cache), set(cache)))
        return scratch.forward(checkpoint, tokens, dtype=dtype, device=device, start_pos=start_pos, cache=cache)

    run = make_run(tiny_checkpoint("3.0"), generate=2, names=["logits"])  # few datasets written: a fast test
    trace_generation(run, resolve(mine), tmp_path / "t.h5")
    own = {f"layers.{layer}.{kv}" for layer in range(run.checkpoint.config.n_layers) for kv in "kv"}
    assert [s for s, _, _ in seen] == [0, len(run.tokens), len(run.tokens) + 1] and len({i for _, i, _ in seen}) == 1
    assert [keys for _, _, keys in seen] == [set(), own, own]


def test_an_adapters_module_lives_in_its_generation_not_in_the_cache(tiny_checkpoint, tmp_path):
    """The module is built once per generation (at the prefill); `run_step` gets the cache with its own state only."""
    built, caches = [], []

    def build(checkpoint, dtype, device):
        built.append(dtype)
        return reference.build_model(checkpoint, dtype, device)

    def run_step(module, tokens, start_pos, cache):
        caches.append(set(cache))
        return reference.HUGGING_FACE.run_step(module, tokens, start_pos, cache)

    adapter = dataclasses.replace(reference.HUGGING_FACE, build=build, run_step=run_step)
    run = make_run(tiny_checkpoint("3.0"), generate=1, names=["logits"])
    for out in ("a.h5", "b.h5"):
        trace_generation(run, resolve(adapter), tmp_path / out)
    assert len(built) == 2 and caches == [set(), {"past_key_values"}] * 2


def test_the_references_caches_live_in_its_decode_step(tiny_checkpoint):
    """HF's DynamicCache and the oracle's stay in the step `decoder` made; the contract's `cache` stays empty."""
    ckpt = open_checkpoint(tiny_checkpoint("3.0"))
    decode, cache = decoder(builtin("reference", oracle=False)), {}
    tokens = torch.tensor([ckpt.config.vocab_size - 256, 5, 6])
    prefill = decode(ckpt, tokens, dtype=torch.float32, device="cpu", start_pos=0, cache=cache)
    step = decode(ckpt, tokens[:1], dtype=torch.float32, device="cpu", start_pos=3, cache=cache)
    assert prefill.shape == (3, ckpt.config.vocab_size) and step.shape == (1, ckpt.config.vocab_size)
    assert cache == {}
