"""harness/cli.py: the commands' options, what each prints, and its exit codes (0 done or agreeing, 1 diverging, 2 bad
input or usage, 3 a bug of ours, 130 interrupted), always one line on stderr; `main` called in this process."""

from __future__ import annotations

import re
import signal

import pytest
import torch

from harness import cli, commands, load_trace, record, tracing
from harness.checkpoint import open_checkpoint
from harness.cli import build_parser, main
from harness.run import DEFAULT_PROMPT
from tests.helpers_bad_input import assert_refused
from tests.helpers_bad_input import cli as run_main

COMMANDS = ["make-tiny", "trace", "convert", "compare", "verify", "golden"]


def test_help_lists_the_commands_and_each_has_its_own_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = re.search(r"\{([^}]*)\}", out)[1].split(",")  # usage: python -m harness [-h] ... {make-tiny,trace,...}
    assert out.startswith("usage: python -m harness [-h]") and listed[: len(COMMANDS)] == COMMANDS, out
    for command in listed:
        assert main([command, "--help"]) == 0, command
        assert capsys.readouterr().out.startswith(f"usage: python -m harness {command} [-h]"), command


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: command"),
        (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
        (["trace", "ckpt"], "the following arguments are required: --out"),
        (["trace", "ckpt", "--out", "t.h5", "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["trace", "ckpt", "--out", "t.h5", "--prompt", "a", "--prompt-file", "p.txt"], "not allowed with argument"),
        (["convert", "a", "b"], "the following arguments are required: --to"),
        (["make-tiny", "d", "--variant", "2.0"], "argument --variant: invalid choice: '2.0'"),
    ],
    ids=["no-command", "unknown-command", "no-out", "unknown-dtype", "two-prompts", "no-to", "unknown-variant"],
)
def test_a_usage_error_is_one_line_naming_the_command_and_exit_2(capsys, argv, message):
    code, out, err = run_main(capsys, *argv)
    assert_refused(code, err, message)
    prog = "python -m harness" + (f" {argv[0]}" if argv and argv[0] in COMMANDS else "")
    assert err.startswith(f"error: {prog}: ") and err.endswith(f" (see {prog} --help)\n"), err
    assert out == ""


def test_defaults_are_the_documented_ones():
    args = build_parser().parse_args(["verify", "ckpt"])
    assert (args.out, args.impl, args.dtype, args.device, args.prompt, args.prompt_file) == (
        "verify-out",
        "scratch",
        "float32",
        "cpu",
        DEFAULT_PROMPT,
        None,
    )
    assert (args.isolated, args.vectorized, args.generate, args.debug) == (False, False, 0, False)
    args = build_parser().parse_args(["make-tiny", "d"])
    assert (args.seed, args.variant, args.format, args.shape) == (0, "3.0", "meta", "tiny")


def test_make_tiny_says_what_it_wrote(capsys, tmp_path):
    assert main(["make-tiny", str(tmp_path / "t"), "--variant", "3.2", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert out == f"wrote a tiny Llama-3.2 checkpoint (meta format, seed 4) to {tmp_path / 't'}\n"
    assert open_checkpoint(tmp_path / "t").config.tie_word_embeddings  # 3.2's tied head


def test_trace_prints_the_next_token_and_writes_the_trace(capsys, tiny_checkpoint, tmp_path):
    code, out, err = run_main(
        capsys, "trace", tiny_checkpoint("3.0"), "--out", tmp_path / "t.h5", "--names", "norm", "logits"
    )
    assert code == 0 and err == "", err
    m = re.fullmatch(r"scratch \(float32, 17 tokens\): next token (.+) \(id (\d+)\); trace written to (.+)\n", out)
    assert m and m[3] == str(tmp_path / "t.h5"), out
    with load_trace(tmp_path / "t.h5") as t:
        assert t.names == ["tokens", "norm", "logits"] and int(t["logits"][-1].argmax()) == int(m[2])


def test_vectorized_is_for_the_scratch_forward_only(capsys, tiny_checkpoint, tmp_path):
    code, _, err = run_main(
        capsys, "trace", tiny_checkpoint("3.0"), "--impl", "reference", "--vectorized", "--out", tmp_path / "t.h5"
    )
    assert_refused(code, err, "error: --vectorized applies to --impl scratch only")
    assert not (tmp_path / "t.h5").exists()


def _trace(path, value: torch.Tensor):
    with tracing(path):
        record("tokens", torch.tensor([1, 2, 3]))
        record("embeddings", value)
    return path


def test_compare_exits_0_on_agreement_and_1_on_divergence_and_writes_json(capsys, tmp_path):
    x = torch.randn(3, 8, dtype=torch.float64)
    a, same, other = _trace(tmp_path / "a.h5", x), _trace(tmp_path / "b.h5", x), _trace(tmp_path / "c.h5", 2 * x)
    code, out, _ = run_main(capsys, "compare", a, same)
    assert code == 0 and out.splitlines()[-1].startswith("PASS: 1/1 names within bound"), out
    code, out, _ = run_main(capsys, "compare", a, other, "--json", tmp_path / "c.json")
    assert code == 1 and out.splitlines()[-1].startswith("FAIL: 0/1 names within bound"), out
    assert '"first_divergence": "embeddings"' in (tmp_path / "c.json").read_text()


def test_compare_names_the_token_text_from_the_trace_checkpoint(tiny_checkpoint):
    text = commands.tokenizer_for({"checkpoint_path": str(tiny_checkpoint("3.0"))})
    assert text(512) == "<|begin_of_text|>"
    assert commands.tokenizer_for({"checkpoint_path": "/no/such/checkpoint"}) is None
    assert commands.tokenizer_for({}) is None


def _raising(error: BaseException):
    def command(args):
        raise error

    return command


def test_a_bug_of_ours_is_one_line_and_exit_3_unless_debug(capsys, monkeypatch):
    monkeypatch.setattr(cli, "cmd_make_tiny", _raising(ValueError("boom")))
    code, _, err = run_main(capsys, "make-tiny", "d")
    assert code == 3 and err == "internal error: ValueError: boom (rerun with --debug for the traceback)\n", err
    with pytest.raises(ValueError, match="boom"):
        main(["--debug", "make-tiny", "d"])


def test_an_interrupt_exits_130_and_the_sigterm_handler_is_put_back(capsys, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "cmd_make_tiny", _raising(KeyboardInterrupt()))
    code, _, err = run_main(capsys, "make-tiny", "d")
    assert code == 130 and err == "interrupted; no output file was written\n", err
    assert signal.getsignal(signal.SIGTERM) is before
