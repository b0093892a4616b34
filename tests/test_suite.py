"""The suite tests itself, as users run it: a deliberate change to the forward's numbers must turn it red, at the right
names; the installed plugin runs it for a user's own implementation in a directory with no test files of its own."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.names import HEAD_NAMES, LAYER_NAMES

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.slow  # each test runs pytest in a subprocess, and the suite there runs verify

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "my_llama.py"

# Loaded with `-p` into the inner run: every layer's scores divided by 1.25 sqrt(head_dim) instead of sqrt(head_dim).
MUTATION = """
import harness.scratch as scratch

scratch.score_scale = lambda config: 1.25 * config.head_dim ** 0.5
"""


def outcomes(lines: list[str]) -> dict[str, str]:
    """Test name ("test_head[layer1-head3-probs]") -> PASSED, FAILED or ERROR, read from the `-rA` short summary."""
    found = {}
    for line in lines:
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "ERROR"):
            found[rest.split(" - ")[0].split("::")[-1]] = word
    return found


def suite_ids(n_layers: int, n_heads: int, case: str) -> list[str]:
    """The test ids of the layer x head suite (harness/suite.py) for one case (a dtype) on a checkpoint of that size."""
    heads = [f"test_head[layer{i}-head{h}-{p}]" for i in range(n_layers) for h in range(n_heads) for p in HEAD_NAMES]
    layers = [f"test_layer[layer{i}-{p}]" for i in range(n_layers) for p in LAYER_NAMES if p != "heads"]
    return heads + layers + [f"test_{t}[{case}]" for t in ("embeddings", "final_norm", "logits", "next_token")]


def test_changed_forward_turns_golden_and_matching_tests_red(pytester):
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
        "-rA",
        "-k",
        selected,
        "--llama3-impl",
        "scratch",
        "--llama3-dtype",
        "float32,bfloat16",
    )
    out = result.stdout.str()
    assert outcomes(result.stdout.lines) == {
        "test_golden[tiny-3.0-seed0-float32]": "FAILED",
        "test_head[tiny3.0-float32-layer0-head2-scores]": "FAILED",
        "test_head[tiny3.0-float32-layer0-head2-q_rotated]": "PASSED",
        "test_layer[tiny3.0-float32-layer1-output]": "FAILED",
    }, out
    result.assert_outcomes(passed=1, failed=3)
    assert "first divergence: layers.0.attention.heads.0.scores" in out, out
    assert "first divergence in the whole trace: layers.0.attention.heads.0.scores" in out, out


def unseen_checkpoint(tmp_path: Path) -> Path:
    """2 layers x 4 heads, one KV head: a shape none of the bundled tiny checkpoints has."""
    from harness.tiny import make_tiny_meta

    ckpt = tmp_path / "unseen"
    make_tiny_meta(
        ckpt,
        seed=7,
        params=dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, multiple_of=16, norm_eps=1e-5, rope_theta=10000.0),
    )
    return ckpt


def run_users_suite(pytester, ckpt: Path, *args: str, source: str | None = None):
    """The plugin as a user runs it: a fresh directory holding only `my_llama.py` (`source`, else
    examples/my_llama.py), pytest in a subprocess on `ckpt` with the space-separated options, then `args`."""
    (pytester.path / "my_llama.py").write_text(EXAMPLE.read_text() if source is None else source)
    options = ["--llama3-impl", "my_llama.py:forward", "--llama3-checkpoint", str(ckpt)]
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "0", "-rA", *options, *args)


def test_plugin_runs_the_suite_for_a_users_file_with_no_test_files(pytester, tmp_path):
    """A fresh directory holding only the user's implementation: the plugin collects the layer x head suite from the
    checkpoint's own config (2 layers x 4 heads here), with the space-separated spelling of the options."""
    ckpt = unseen_checkpoint(tmp_path)
    result = run_users_suite(pytester, ckpt, "--llama3-dtype", "bfloat16")
    out = result.stdout.str()
    expected = suite_ids(2, 4, "bfloat16")  # 2 layers x 4 heads x 8 names, 2 x 9 layer names and 4 for the model
    assert len(expected) == 2 * 4 * 8 + 2 * 9 + 4
    assert outcomes(result.stdout.lines) == dict.fromkeys(expected, "PASSED"), out
    result.assert_outcomes(passed=len(expected))
    assert "my_llama.py:forward against Hugging Face" in out, out
    assert sorted(p.name for p in ckpt.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"], (
        "pytest wrote into the checkpoint directory (taken for its rootdir?)"
    )


def test_plugin_turns_red_at_the_layer_and_head_of_a_bug(pytester, tmp_path):
    """The user's file with a bug in head 2 of the last layer's scores: red there (and after it in that head), named
    with the file, the first divergence and the compare command; isolated, so nothing before it drifts."""
    ckpt = unseen_checkpoint(tmp_path)
    source = re.sub(  # the example's scores line, `q_rotated @ keys... / hd**0.5`, scaled in one head
        r"(scores = q_rotated @ keys[^/\n]*/ hd\*\*0\.5)",
        r"\1 * (1.5 if (layer, head) == (1, 2) else 1)",
        EXAMPLE.read_text(),
        count=1,
    )
    assert source != EXAMPLE.read_text()
    result = run_users_suite(pytester, ckpt, "--llama3-dtype", "float32", "--llama3-isolated", source=source)
    out = result.stdout.str()
    # red: head 2's scores and what follows from them in that head, then every later name of layer 1; isolated, the
    # final norm gets the reference's input, so nothing after layer 1 is red
    after_heads = LAYER_NAMES[LAYER_NAMES.index("heads") + 1 :]
    red = [f"test_head[layer1-head2-{p}]" for p in ("scores", "probs", "output")]
    red += [f"test_layer[layer1-{p}]" for p in after_heads]
    expected = {name: "FAILED" if name in red else "PASSED" for name in suite_ids(2, 4, "float32")}
    assert outcomes(result.stdout.lines) == expected, out
    assert (
        "diverges in my_llama.py:forward" in out
        and "first divergence in the whole trace: layers.1.attention.heads.2.scores" in out
    ), out
    assert "rerun: python -m harness compare" in out and "implementation.h5" in out, out


def test_repo_suite_takes_a_checkpoint_outside_the_repo_with_a_space(tmp_path):
    """`pytest --checkpoint DIR` (not `--checkpoint=DIR`) in this repository, DIR anywhere: pytest must not take DIR for
    its rootdir (it would then miss this repo's pyproject.toml and conftest.py)."""
    ckpt = unseen_checkpoint(tmp_path)
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
            "-rA",
            "-k",
            "test_head and layer1-head3-probs or test_next_token",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    passed = {"test_head[layer1-head3-probs]": "PASSED", "test_next_token[bfloat16]": "PASSED"}
    assert outcomes(result.stdout.splitlines()) == passed, result.stdout[-3000:]
    assert f"rootdir: {ROOT}" in result.stdout, result.stdout[:2000]


def test_plugin_generate_parametrizes_by_step(pytester, tmp_path):
    """--llama3-generate N: head and layer tests for every step (step0: the prefill), the example with its KV cache."""
    ckpt = unseen_checkpoint(tmp_path)
    selected = "step2-layer1-head3 or step0-layer0-output or next_token"
    result = run_users_suite(pytester, ckpt, "--llama3-dtype", "float32", "--llama3-generate", "2", "-k", selected)
    parts = [*HEAD_NAMES[:5], "cache_k", "cache_v", *HEAD_NAMES[5:]]  # a decode step's head attends over its cache
    expected = [f"test_head[step2-layer1-head3-{p}]" for p in parts] + [
        "test_layer[step0-layer0-output]",
        "test_next_token[float32]",
    ]
    assert outcomes(result.stdout.lines) == dict.fromkeys(expected, "PASSED"), result.stdout.str()
    result.assert_outcomes(passed=10 + 1 + 1)  # 10 head names (cache_k/cache_v included), one layer name, next token
