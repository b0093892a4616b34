"""The two public implementations in examples/ through `verify --generate`: a prefill and decode steps with each
library's own KV cache, held to Hugging Face step by step and to their own no-cache forward, on every tiny variant in
float32 and bfloat16; and wrong uses of each cache caught at their own step and name.

Needs llama-models, fairscale and llms-from-scratch (`tox -e examples`); without them these tests skip.
"""

import json
from pathlib import Path

import pytest

from harness.verify import verify
from tests.helpers import GENERATION_STEPS, assert_passes, first_failure

EXAMPLES = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
ADAPTERS = {"llama_models": "llama_models_adapter.py", "llms_from_scratch": "llms_from_scratch_adapter.py"}
HEAD0 = "layers.0.attention.heads.0"
WRONG_CACHE = {  # wrong_adapters.py's attribute -> (its package, where it must fail on tiny 3.0)
    "LLAMA_MODELS_START_POS_0": ("llama_models", f"steps.1.{HEAD0}.cache_k"),
    "LLMS_FROM_SCRATCH_POSITIONS_RESTART": ("llms_from_scratch", f"steps.1.{HEAD0}.q_rotated"),
}

pytestmark = pytest.mark.slow  # verify, and the reference's generation with its float64 oracle


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["3.0", "3.1", "3.2"])
@pytest.mark.parametrize("package", ADAPTERS)
def test_adapter_generates_with_its_own_cache(package, variant, dtype, tiny_checkpoint, tmp_path):
    pytest.importorskip(package)
    impl = f"{EXAMPLES / ADAPTERS[package]}:ADAPTER"
    result = verify(tiny_checkpoint(variant), out=tmp_path / "v", dtype=dtype, impl=impl, generate=GENERATION_STEPS)
    generation = json.loads((tmp_path / "v" / "comparison.json").read_text())["generation"]
    assert not generation["unexplained_disagreements"], generation["unexplained_disagreements"]
    assert result.comparison.result(f"steps.{GENERATION_STEPS}.{HEAD0}.cache_k") is not None, (
        "the cache is not recorded"
    )
    assert_passes(None, f"{package} {variant} {dtype}", result.comparison.results + result.cache_check)


@pytest.mark.xdist_group("generation-references")  # conftest.py's `generation_references`, traced once
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("wrong", WRONG_CACHE)
def test_wrong_cache_fails_at_its_step_and_name(wrong, dtype, generation_references, tmp_path):
    package, expected = WRONG_CACHE[wrong]
    pytest.importorskip(package)
    run, reference = generation_references[dtype]
    first, how = first_failure(run, reference, tmp_path / "wrong.h5", impl=f"{HERE / 'wrong_adapters.py'}:{wrong}")
    assert first == expected, f"{wrong} ({dtype}): first failure {first} ({how}), expected {expected}"
