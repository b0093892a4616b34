"""The two public implementations in examples/ verified through their adapters on every tiny variant, in float32 and
bfloat16, end to end and isolated: no false alarm; and a deliberately wrong adapter of each caught at `q`.

Needs llama-models, fairscale and llms-from-scratch (`tox -e examples`); without them these tests skip.
"""

from pathlib import Path

import pytest

from harness.verify import verify

EXAMPLES = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
ADAPTERS = {"llama_models": "llama_models_adapter.py", "llms_from_scratch": "llms_from_scratch_adapter.py"}
WRONG = {"llama_models": "LLAMA_MODELS_HALF_SPLIT", "llms_from_scratch": "LLMS_FROM_SCRATCH_UNPERMUTED"}

pytestmark = pytest.mark.slow  # verify: the reference with its float64 oracle


def _verdict(result) -> str:
    worst = max(result.comparison.results, key=lambda r: r.ratio)
    return (
        f"{result.implementation}: first divergence {result.comparison.first_divergence}, "
        f"largest ratio {worst.ratio:.3g} at {worst.name} (report: {result.out / 'report.html'})"
    )


@pytest.mark.parametrize("isolated", [False, True], ids=["end_to_end", "isolated"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["3.0", "3.1", "3.2"])
@pytest.mark.parametrize("package", ADAPTERS)
def test_adapter_passes(package, variant, dtype, isolated, tiny_checkpoint, tmp_path):
    pytest.importorskip(package)
    impl = f"{EXAMPLES / ADAPTERS[package]}:ADAPTER"
    result = verify(tiny_checkpoint(variant), out=tmp_path / "verify", dtype=dtype, isolated=isolated, impl=impl)
    assert result.passed, _verdict(result)
    assert result.comparison.result("layers.0.attention.heads.0.q_rotated") is not None, "rotated q not recorded"


@pytest.mark.parametrize("isolated", [False, True], ids=["end_to_end", "isolated"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("package", ADAPTERS)
def test_wrong_adapter_fails_at_q(package, dtype, isolated, tiny_checkpoint, tmp_path):
    pytest.importorskip(package)
    impl = f"{HERE / 'wrong_adapters.py'}:{WRONG[package]}"
    result = verify(tiny_checkpoint("3.0"), out=tmp_path / "verify", dtype=dtype, isolated=isolated, impl=impl)
    assert not result.passed, _verdict(result)
    assert result.comparison.first_divergence == "layers.0.attention.heads.0.q", _verdict(result)
