"""A user's own Llama-3 through every command: `--impl` as a notebook-style function (examples/my_llama.py) or a module
path (an `Adapter`: tests/test_adapter.py); isolated mode through `harness.layer_input`; bad implementations refused
with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import harness
from harness import names
from harness.checkpoint import open_checkpoint
from harness.cli import main
from harness.compare import compare_traces
from harness.run import trace_reference
from harness.verify import verify
from tests.helpers_bad_input import assert_refused, cli, snapshot

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "my_llama.py"
SCORES = "scores = q_rotated @ keys.transpose(-2, -1) / hd**0.5"


def mutated_example(folder: Path, old: str, new: str) -> Path:
    source = EXAMPLE.read_text()
    assert old in source, f"{old!r} not in {EXAMPLE}"
    path = folder / "mutated_llama.py"
    path.write_text(source.replace(old, new))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant, dtype, isolated",
    [("3.0", "bfloat16", False), ("3.1", "float32", True), ("3.2", "bfloat16", True), ("3.2", "float32", False)],
)
def test_the_notebook_style_example_passes(tiny_checkpoint, tmp_path, variant, dtype, isolated):
    result = verify(
        tiny_checkpoint(variant), out=tmp_path / "v", dtype=dtype, isolated=isolated, impl=f"{EXAMPLE}:forward"
    )
    assert result.passed, f"first divergence {result.comparison.first_divergence}"
    c = open_checkpoint(tiny_checkpoint(variant)).config
    compared = [n for n in names.canonical_names(c.n_layers, c.n_heads) if n != "tokens"]
    assert sorted(r.name for r in result.comparison.results) == sorted(compared)
    assert result.trace_path.name == "implementation.h5"
    assert result.reference_token == result.implementation_token
    attrs = harness.load_trace(result.trace_path).attrs
    assert attrs["implementation"] == f"{EXAMPLE}:forward" and attrs["isolated"] == isolated
    assert attrs["checkpoint"] == open_checkpoint(tiny_checkpoint(variant)).fingerprint()
    assert (tmp_path / "v" / "report.html").is_file()


@pytest.mark.slow
def test_a_mutated_copy_fails_at_the_name_of_its_bug(tiny_checkpoint, tmp_path):
    impl = mutated_example(
        tmp_path, "hidden = torch.nn.functional.silu(gate) * up", "hidden = gate * torch.nn.functional.silu(up)"
    )
    result = verify(tiny_checkpoint("3.0"), out=tmp_path / "v", dtype="bfloat16", impl=f"{impl}:forward")
    assert not result.passed and result.comparison.first_divergence == "layers.0.feed_forward.hidden"


@pytest.mark.slow
def test_isolated_finds_a_last_layer_bug_in_the_last_layer(tiny_checkpoint, tmp_path):
    """Heads 0-1 of the last layer scaled wrong: isolated, nothing before layer 2 fails and layer 2 diverges first."""
    impl = mutated_example(tmp_path, SCORES, SCORES + " * (1.3 if layer == config.n_layers - 1 and head < 2 else 1)")
    result = verify(tiny_checkpoint("3.0"), out=tmp_path / "v", dtype="bfloat16", isolated=True, impl=f"{impl}:forward")
    assert result.comparison.first_divergence == "layers.2.attention.heads.0.scores"
    assert all(r.layer == 2 or r.passed for r in result.comparison.results), [r.name for r in result.comparison.failed]


@pytest.mark.slow
def test_module_attr_from_pythonpath_through_the_cli(tiny_checkpoint, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(EXAMPLE.parent))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "verify",
            str(tiny_checkpoint("3.0")),
            "--impl",
            "my_llama:forward",
            "--out",
            str(tmp_path / "v"),
            "--dtype",
            "bfloat16",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "my_llama:forward" in proc.stdout and json.loads((tmp_path / "v" / "comparison.json").read_text())["passed"]


# ---- the fingerprint through the public API ------------------------------------------------------------------------


def test_a_hand_written_trace_stamped_with_its_checkpoint_is_refused_against_another(tiny_checkpoint, tmp_path, capsys):
    ckpt, other = open_checkpoint(tiny_checkpoint("3.0")), open_checkpoint(tiny_checkpoint("3.0", seed=1))
    trace_reference(other, tmp_path / "ref.h5", dtype="float32", oracle=False)
    tokens = torch.tensor(harness.load_trace(tmp_path / "ref.h5").tokens)
    with harness.tracing(tmp_path / "mine.h5", checkpoint=ckpt):
        harness.record("tokens", tokens)
        harness.record("embeddings", ckpt.tensor("tok_embeddings.weight")[tokens].float())
    assert harness.load_trace(tmp_path / "mine.h5").attrs["checkpoint"] == ckpt.fingerprint()
    code, _, err = cli(capsys, "compare", tmp_path / "ref.h5", tmp_path / "mine.h5")
    assert_refused(code, err, "different checkpoints")
    trace_reference(ckpt, tmp_path / "ref0.h5", dtype="float32", oracle=False)
    assert compare_traces(tmp_path / "ref0.h5", tmp_path / "mine.h5").passed


# ---- bad implementations: one line, exit 2, no file written or changed ----------------------------------------------

BAD = {
    "missing_attr": (
        "def forward(checkpoint, tokens, *, dtype, device):\n    pass\n",
        "forwad",
        "no attribute 'forwad'",
    ),
    "not_callable": ("forward = 42\n", "forward", "not callable"),
    "wrong_signature": ("def forward(tokens):\n    pass\n", "forward", "does not accept"),
    "raises": (
        "def forward(checkpoint, tokens, *, dtype, device):\n    raise ValueError('boom')\n",
        "forward",
        "raised ValueError: boom",
    ),
    "syntax_error": ("def forward(:\n", "forward", "SyntaxError"),
    "records_nothing": (
        "import torch\ndef forward(checkpoint, tokens, *, dtype, device):\n"
        "    return torch.zeros(len(tokens), checkpoint.config.vocab_size)\n",
        "forward",
        "recorded nothing",
    ),
    "wrong_record_shape": (
        "import torch, harness\ndef forward(checkpoint, tokens, *, dtype, device):\n"
        "    harness.record('embeddings', torch.zeros(len(tokens), 3))\n"
        "    return torch.zeros(len(tokens), checkpoint.config.vocab_size)\n",
        "forward",
        "'embeddings' with shape [17, 3], expected [17, 128]",
    ),
    "wrong_logits_shape": (
        "import torch, harness\ndef forward(checkpoint, tokens, *, dtype, device):\n"
        "    harness.record('embeddings', torch.zeros(len(tokens), checkpoint.config.dim))\n"
        "    return torch.zeros(1, len(tokens), checkpoint.config.vocab_size)\n",
        "forward",
        "returned logits [1, 17, 768], expected",
    ),
}


@pytest.mark.parametrize("command", ["trace", pytest.param("verify", marks=pytest.mark.slow)])  # verify: the reference
@pytest.mark.parametrize("kind", BAD)
def test_a_bad_implementation_is_refused_with_one_line(capsys, tmp_path, tiny_checkpoint, kind, command):
    source, attr, fragment = BAD[kind]
    (tmp_path / "bad_llama.py").write_text(source)
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / ("t.h5" if command == "trace" else "v")
    if command == "verify":
        target.mkdir()
        (target / "implementation.h5").write_bytes(b"an earlier run")
    before = snapshot(tmp_path)
    spec = f"{tmp_path / 'bad_llama.py'}:{attr}"
    code, _, err = cli(capsys, command, tiny_checkpoint("3.0"), "--impl", spec, "--out", target)
    assert_refused(code, err, spec, fragment)
    assert snapshot(tmp_path) == before, "a refused implementation must leave no file written or changed"


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("no/such/file.py:forward", "file no/such/file.py not found"),
        ("no_such_module:forward", "no module named 'no_such_module'"),
        ("forward", "expected scratch, reference, MODULE:ATTR"),
    ],
)
def test_an_implementation_that_cannot_be_found_is_refused_before_any_work(
    capsys, tmp_path, tiny_checkpoint, spec, fragment
):
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "trace", tiny_checkpoint("3.0"), "--impl", spec, "--out", tmp_path / "out" / "t.h5")
    assert_refused(code, err, fragment)
    assert snapshot(tmp_path) == before


@pytest.mark.slow  # verify traces the reference first
def test_isolated_mode_needs_layer_input_calls(capsys, tmp_path, tiny_checkpoint):
    impl = mutated_example(tmp_path, "        x = harness.layer_input(layer, x)\n", "")
    code, _, err = cli(
        capsys, "verify", tiny_checkpoint("3.0"), "--impl", f"{impl}:forward", "--isolated", "--out", tmp_path / "v"
    )
    assert_refused(code, err, "harness.layer_input was never called for layer(s) 0, 1, 2")
    assert not (tmp_path / "v" / "implementation.h5").exists()


def test_debug_shows_the_implementations_own_traceback(tmp_path, tiny_checkpoint):
    (tmp_path / "bad_llama.py").write_text(
        "def forward(checkpoint, tokens, *, dtype, device):\n    raise ValueError('boom')\n"
    )
    with pytest.raises(harness.HarnessError) as info:
        main(
            [
                "--debug",
                "trace",
                str(tiny_checkpoint("3.0")),
                "--impl",
                f"{tmp_path / 'bad_llama.py'}:forward",
                "--out",
                str(tmp_path / "t.h5"),
            ]
        )
    assert isinstance(info.value.__cause__, ValueError)
