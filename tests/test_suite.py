"""The suite tests itself, as users run it: a deliberate change to the forward's numbers must turn it red, at the right
names; the installed plugin runs it for a user's own implementation in a directory with no test files of its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "my_llama.py"

# Loaded with `-p` into the inner run: every layer's scores are scaled by 1/(1.25 sqrt(head_dim)) instead of 1/sqrt(head_dim).
MUTATION = """
import harness.scratch as scratch

scratch.score_scale = lambda config: 1.25 * config.head_dim ** 0.5
"""


def test_changed_forward_turns_golden_and_matching_tests_red(pytester):
    shutil.copy(ROOT / "conftest.py", pytester.path / "conftest.py")
    shutil.copy(ROOT / "tests" / "test_golden.py", pytester.path / "test_golden.py")
    pytester.makepyfile(mutate_forward=MUTATION)
    selected = (
        "test_golden and 3.0-seed0-float32 or "
        "tiny3.0-float32 and (layer0-head2-scores or layer0-head2-q_rotated or layer1-output)"
    )
    result = pytester.runpytest_subprocess(
        "-p",
        "mutate_forward",
        "-p",
        "no:cacheprovider",
        "-n",
        "0",
        "-k",
        selected,
        "--llama3-impl",
        "scratch",
        "--llama3-dtype",
        "float32,bfloat16",
    )
    result.assert_outcomes(passed=1, failed=3)
    out = result.stdout.str()
    for red in (
        "test_golden[tiny-3.0-seed0-float32]",
        "test_head[tiny3.0-float32-layer0-head2-scores]",
        "test_layer[tiny3.0-float32-layer1-output]",
    ):
        assert f"FAILED {red}" in out or f"FAILED test_golden.py::{red}" in out or red in out, f"{red} not red:\n{out}"
    assert "first divergence: layers.0.attention.heads.0.scores" in out, out
    assert "first divergence in the whole trace: layers.0.attention.heads.0.scores" in out, out


def _unseen_checkpoint(tmp_path: Path) -> Path:
    from harness.tiny import make_tiny_meta

    ckpt = tmp_path / "unseen"
    make_tiny_meta(
        ckpt,
        seed=7,
        params=dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, multiple_of=16, norm_eps=1e-5, rope_theta=10000.0),
    )
    return ckpt


def test_plugin_runs_the_suite_for_a_users_file_with_no_test_files(pytester, tmp_path):
    """A fresh directory holding only the user's implementation: the plugin collects the layer x head suite from the
    checkpoint's own config (2 layers x 4 heads here), with the space-separated spelling of the options."""
    ckpt = _unseen_checkpoint(tmp_path)
    shutil.copy(EXAMPLE, pytester.path / "my_llama.py")
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-n",
        "0",
        "-v",
        "--llama3-impl",
        "my_llama.py:forward",
        "--llama3-checkpoint",
        str(ckpt),
        "--llama3-dtype",
        "bfloat16",
    )
    out = result.stdout.str()
    # 2 layers x 4 heads x 8 names + 2 x 9 layer names + embeddings, final norm, logits, next token
    result.assert_outcomes(passed=2 * 4 * 8 + 2 * 9 + 4)
    assert "test_head[layer1-head3-q_rotated] PASSED" in out and "test_layer[layer1-ffn_norm] PASSED" in out, out
    assert "my_llama.py:forward against Hugging Face" in out, out
    assert "layer2" not in out and "head4" not in out, "ids beyond the checkpoint's 2 layers x 4 heads"
    assert sorted(p.name for p in ckpt.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"], (
        "pytest wrote into the checkpoint directory (taken for its rootdir?)"
    )


def test_plugin_turns_red_at_the_layer_and_head_of_a_bug(pytester, tmp_path):
    """The user's file with a bug in head 2 of the last layer's scores: red there (and after it in that head), named
    with the file, the first divergence and the compare command; isolated, so nothing before it drifts."""
    ckpt = _unseen_checkpoint(tmp_path)
    source = EXAMPLE.read_text().replace(
        "scores = q_rotated @ keys.T / hd**0.5",
        "scores = q_rotated @ keys.T / hd**0.5 * (1.5 if (layer, head) == (1, 2) else 1)",
    )
    assert source != EXAMPLE.read_text()
    (pytester.path / "my_llama.py").write_text(source)
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-n",
        "0",
        "--llama3-impl",
        "my_llama.py:forward",
        "--llama3-checkpoint",
        str(ckpt),
        "--llama3-dtype",
        "float32",
        "--llama3-isolated",
    )
    out = result.stdout.str()
    failed = sorted(line.split("::")[-1].split(" ")[0] for line in out.splitlines() if line.startswith("FAILED"))
    assert failed and all(name.startswith("test_head[layer1-head2-") for name in failed[:3]), out
    assert "test_head[layer1-head2-scores]" in failed and not any("layer0" in f for f in failed), failed
    assert (
        "diverges in my_llama.py:forward" in out
        and "first divergence in the whole trace: layers.1.attention.heads.2.scores" in out
    ), out
    assert "rerun: python -m harness compare" in out and "implementation.h5" in out, out


def test_repo_suite_takes_a_checkpoint_outside_the_repo_with_a_space(tmp_path):
    """`pytest --checkpoint DIR` (not `--checkpoint=DIR`) in this repository, DIR anywhere: pytest must not take DIR for
    its rootdir (it would then miss this repo's pyproject.toml and conftest.py)."""
    ckpt = _unseen_checkpoint(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-n",
            "0",
            "--checkpoint",
            str(ckpt),
            "--dtype",
            "bfloat16",
            "-k",
            "test_head and layer1-head3-probs or test_next_token",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 passed" in result.stdout, result.stdout[-3000:]
    assert f"rootdir: {ROOT}" in result.stdout, result.stdout[:2000]


def test_plugin_generate_parametrizes_by_step(pytester, tmp_path):
    """--llama3-generate N: the head and layer tests of every step (step0 the prefill), the example with its KV cache."""
    ckpt = _unseen_checkpoint(tmp_path)
    shutil.copy(EXAMPLE, pytester.path / "my_llama.py")
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-n",
        "0",
        "-v",
        "--llama3-impl",
        "my_llama.py:forward",
        "--llama3-checkpoint",
        str(ckpt),
        "--llama3-dtype",
        "float32",
        "--llama3-generate",
        "2",
        "-k",
        "step2-layer1-head3 or step0-layer0-output or next_token",
    )
    out = result.stdout.str()
    result.assert_outcomes(passed=10 + 1 + 1)  # 10 head names (cache_k/cache_v included), one layer name, next token
    assert "test_head[step2-layer1-head3-cache_k] PASSED" in out and "test_layer[step0-layer0-output] PASSED" in out, (
        out
    )
