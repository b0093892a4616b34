"""The suite tests itself: a deliberate change to the forward's numbers must turn it red, at the right names."""

from __future__ import annotations

import shutil
from pathlib import Path

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent

# Loaded with `-p` into the inner run: every layer's scores are scaled by 1/(1.25 sqrt(head_dim)) instead of 1/sqrt(head_dim).
MUTATION = '''
import harness.scratch as scratch

scratch.score_scale = lambda config: 1.25 * config.head_dim ** 0.5
'''


def test_changed_forward_turns_golden_and_matching_tests_red(pytester):
    shutil.copy(ROOT / "conftest.py", pytester.path / "conftest.py")
    for name in ("test_llama.py", "test_golden.py"):
        shutil.copy(ROOT / "tests" / name, pytester.path / name)
    pytester.makepyfile(mutate_forward=MUTATION)
    selected = ("test_golden and 3.0-seed0-float32 or "
                "tiny3.0-float32 and (layer0-head2-scores or layer0-head2-q_rotated or layer1-output)")  # fmt: skip
    result = pytester.runpytest_subprocess("-p", "mutate_forward", "-p", "no:cacheprovider", "-n", "0",
                                           "-k", selected, "--dtype", "float32,bfloat16")  # fmt: skip
    result.assert_outcomes(passed=1, failed=3)
    out = result.stdout.str()
    for red in ("test_golden[tiny-3.0-seed0-float32]", "test_head[tiny3.0-float32-layer0-head2-scores]",
                "test_layer[tiny3.0-float32-layer1-output]"):  # fmt: skip
        assert f"FAILED {red}" in out or f"FAILED test_golden.py::{red}" in out or red in out, f"{red} not red:\n{out}"
    assert "first divergence: layers.0.attention.heads.0.scores" in out, out
    assert "first divergence in the whole trace: layers.0.attention.heads.0.scores" in out, out


def test_suite_runs_on_a_checkpoint_it_has_never_seen(pytester, tmp_path):
    """`--checkpoint DIR`: layers and heads come from that checkpoint's config, into the test ids."""
    from harness.tiny import make_tiny_meta

    ckpt = tmp_path / "unseen"
    make_tiny_meta(ckpt, seed=7, params=dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, multiple_of=16,
                                              norm_eps=1e-5, rope_theta=10000.0))  # fmt: skip
    shutil.copy(ROOT / "conftest.py", pytester.path / "conftest.py")
    shutil.copy(ROOT / "tests" / "test_llama.py", pytester.path / "test_llama.py")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "0", "-v", f"--checkpoint={ckpt}",
                                           "--dtype=bfloat16", str(pytester.path))  # fmt: skip
    out = result.stdout.str()
    # 2 layers x 4 heads x 8 names + 2 x 9 layer names + embeddings, final norm, logits, next token
    result.assert_outcomes(passed=2 * 4 * 8 + 2 * 9 + 4)
    assert "test_head[layer1-head3-q_rotated] PASSED" in out and "test_layer[layer1-ffn_norm] PASSED" in out, out
    assert "layer2" not in out and "head4" not in out, "ids beyond the checkpoint's 2 layers x 4 heads"
