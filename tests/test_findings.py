"""A newcomer's findings (issue 21, section 2), one test each, named after the finding: each fails if it comes back.

Fast ones use small hand-written traces and the CLI in this process; those that run the reference are marked slow.
"""

from __future__ import annotations

import ast
import io
import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import harness
from harness import cli, progress, record, tracing
from harness.cli import build_parser, main
from harness.compare import compare_traces
from harness.errors import HarnessError
from harness.names import ORACLE_PREFIX
from harness.plots import MAX_CELLS, _readable
from harness.report import generation_lines, summary_line, text_report
from harness.run import DEFAULT_PROMPT, make_run
from harness.verify import VERIFY_FILES

ROOT = Path(__file__).resolve().parent.parent
TOKENS = [1, 5, 7, 2]


def write_trace(path: Path, tensors: dict[str, torch.Tensor], **metadata) -> Path:
    """A bare trace through the public recording API: the tokens, then the given names."""
    with tracing(path, **metadata):
        record("tokens", torch.tensor(TOKENS))
        for name, value in tensors.items():
            record(name, value)
    return path


def noisy(x: torch.Tensor, rel: float, seed: int) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return x + noise * (rel * x.norm() / noise.norm())


def oracle_pair(tmp_path: Path, dtype_a: str, dtype_b: str) -> tuple[Path, Path]:
    """A reference trace of `dtype_a` (a float64 oracle, and its own rounding of it) and a B of `dtype_b` whose error is
    that of its dtype's rounding (2^-9 relative for bfloat16, 2^-25 for float32)."""
    truth = torch.randn(len(TOKENS), 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rounding = {"float32": 2.0**-25, "bfloat16": 2.0**-9}
    a = {"norm": noisy(truth, rounding[dtype_a], 1), ORACLE_PREFIX + "norm": truth}
    ref = write_trace(tmp_path / f"ref-{dtype_a}.h5", a, dtype=dtype_a, checkpoint_path="/ckpt")
    b = write_trace(tmp_path / f"b-{dtype_b}.h5", {"norm": noisy(truth, rounding[dtype_b], 2)}, dtype=dtype_b)
    return ref, b


# ---- 1. false FAIL across dtypes -------------------------------------------------------------------------------------


def test_false_fail_across_dtypes_is_refused_with_the_command_to_rerun_the_reference(tmp_path, capsys):
    ref, b = oracle_pair(tmp_path, "float32", "bfloat16")
    assert main(["compare", str(ref), str(b)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "bfloat16" in err and "float32" in err, err
    command = re.search(r"python -m harness trace \S+ --impl reference --dtype bfloat16 --out \S+", err)
    assert command and command[0].split()[4] == "/ckpt", err
    build_parser().parse_args(shlex.split(command[0])[3:])  # the command printed is one the CLI takes


def test_false_fail_across_dtypes_a_more_precise_b_is_judged_at_the_references_rounding(tmp_path):
    """A float32 B against a bfloat16 reference: sound (its error is far under bfloat16 rounding), and said."""
    ref, b = oracle_pair(tmp_path, "bfloat16", "float32")
    c = compare_traces(ref, b)
    assert c.passed and c.mode == "oracle", c
    assert any(line.startswith("note: B ran in float32, A in bfloat16") for line in text_report(c).splitlines())


@pytest.mark.slow
def test_false_fail_across_dtypes_on_real_traces(traced_pair, capsys):
    """The finding's own commands: a float32 reference and a bfloat16 scratch trace (52/222 names failed)."""
    ref32, _ = traced_pair("3.0", "float32")
    ref16, bf16 = traced_pair("3.0", "bfloat16")
    assert main(["compare", str(ref32), str(bf16)]) == 2
    assert "--impl reference --dtype bfloat16" in capsys.readouterr().err
    assert main(["compare", str(ref16), str(bf16)]) == 0


# ---- 2. tracing(dtype=torch.bfloat16) --------------------------------------------------------------------------------


def test_tracing_takes_a_torch_dtype_or_a_known_name(tmp_path):
    for dtype in (torch.bfloat16, "bfloat16"):
        path = write_trace(tmp_path / "t.h5", {"norm": torch.zeros(4, 8)}, dtype=dtype)
        with harness.load_trace(path) as t:
            assert t.attrs["dtype"] == "bfloat16"
    for wrong in ("bf16", torch.int8, 16):
        with pytest.raises(HarnessError, match=r"^harness.tracing\(dtype=.*\): expected float64, float32, bfloat16"):
            write_trace(tmp_path / "u.h5", {"norm": torch.zeros(4, 8)}, dtype=wrong)
    assert not (tmp_path / "u.h5").exists()


# ---- 3. `~` in the checkpoint path -----------------------------------------------------------------------------------


def test_trace_expands_tilde_in_the_checkpoint_path(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "ck").symlink_to(tiny_checkpoint("3.0"), target_is_directory=True)
    monkeypatch.setenv("HOME", str(home))
    assert main(["trace", "~/ck", "--out", str(tmp_path / "t.h5"), "--names", "norm"]) == 0, capsys.readouterr().err
    assert (tmp_path / "t.h5").is_file()


# ---- 4. where the recording example's tokens come from ---------------------------------------------------------------


def test_prompt_tokens_is_public_and_are_the_tokens_a_run_uses(tiny_checkpoint):
    ckpt = tiny_checkpoint("3.0")
    assert harness.prompt_tokens(ckpt, "hello there") == make_run(ckpt, prompt="hello there").tokens
    assert harness.prompt_tokens(str(ckpt)) == make_run(ckpt, prompt=DEFAULT_PROMPT).tokens


def test_the_recording_example_keeps_every_name_it_records():
    """docs/adapters.md's bare recording: its `names` globs keep every name it records, and its tokens come from
    harness.prompt_tokens."""
    import fnmatch

    page = (ROOT / "docs" / "adapters.md").read_text(encoding="utf-8")
    section = page[page.index("## 3. Record by hand") :]
    code = section[section.index("```python") + 9 : section.index("```", section.index("```python") + 9)]
    assert "harness.prompt_tokens(" in code
    globs = ast.literal_eval(re.search(r"^names = (\[.*?\])", code, re.M)[1])
    recorded = re.findall(r'harness\.record\("([^"]+)"', code)
    dropped = [n for n in recorded if n != "tokens" and not any(fnmatch.fnmatchcase(n, g) for g in globs)]
    assert recorded and not dropped, f"the example records {dropped} but its names={globs} drop them"


# ---- 5. misspelled names ---------------------------------------------------------------------------------------------


def test_misspelled_names_are_listed_as_not_canonical_b_only_first(tmp_path, capsys):
    x = torch.randn(len(TOKENS), 8, dtype=torch.float64)
    a = write_trace(tmp_path / "a.h5", {"embeddings": x, "layers.0.attention.heads.3.qq": x})
    extra = {"my_custom_thing": x, "layers.0.norm": x}  # a model-level part under a layer is no canonical name either
    b = write_trace(tmp_path / "b.h5", {"embeddings": x, "layers.0.attention.heads.3.qq": x, **extra})
    assert main(["compare", str(a), str(b), "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    expected = ["layers.0.norm", "my_custom_thing", "layers.0.attention.heads.3.qq"]  # B-only first, in trace order
    assert f"warning: 3 names are not canonical (misspelled? README: Canonical names): {', '.join(expected)}" in out
    assert json.loads((tmp_path / "c.json").read_text())["not_canonical"] == expected
    assert compare_traces(a, a).not_canonical == ["layers.0.attention.heads.3.qq"]


# ---- 9. progress on long runs ----------------------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_are_drawn_per_phase_on_a_terminal_only():
    assert progress.wanted(FakeTerminal()) and not progress.wanted(io.StringIO())
    terminal = FakeTerminal()
    with progress.phase("reference and its float64 oracle", enabled=progress.wanted(terminal), stream=terminal):
        pass
    assert "reference and its float64 oracle: 00:00" in terminal.getvalue()
    quiet = io.StringIO()
    with progress.phase("compare", enabled=progress.wanted(quiet), stream=quiet):
        pass
    assert quiet.getvalue() == ""


def test_progress_transformers_loading_bar_is_quiet_and_put_back():
    from transformers.utils import logging

    assert logging.is_progress_bar_enabled()
    with progress.quiet_transformers():
        assert not logging.is_progress_bar_enabled()
    assert logging.is_progress_bar_enabled()


# ---- 10. a verify's folder holds exactly that run's files ------------------------------------------------------------


@pytest.mark.slow
def test_verify_into_a_previous_verify_folder_leaves_no_stale_file(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "v"
    out.mkdir()
    stale = ["scratch.h5", "scratch-nocache.h5", "steps.png", "positions.png", "report.html"]
    for name in [*stale, "my-notes.txt"]:
        (out / name).write_text("a previous run's")
    impl = str(ROOT / "examples" / "my_llama.py") + ":forward"
    assert main(["verify", str(tiny_checkpoint("3.0")), "--out", str(out), "--impl", impl]) == 0
    printed = capsys.readouterr().out
    replaced = [name for name in VERIFY_FILES if name in stale]  # in the order verify lists them
    assert f"{out} held a previous verify's files: replaced ({', '.join(replaced)})" in printed
    written = {"reference.h5", "implementation.h5", "comparison.json", "report.html", "heads.png", "depth.png"}
    assert {p.name for p in out.iterdir()} == written | {"attention.png", "my-notes.txt"}
    assert (out / "my-notes.txt").read_text() == "a previous run's"


# ---- 11. --debug anywhere, --version ---------------------------------------------------------------------------------


def test_debug_is_accepted_after_the_command_and_version_is_printed(monkeypatch, capsys):
    parse = build_parser().parse_args
    assert parse(["verify", "ck", "--debug"]).debug and parse(["--debug", "verify", "ck"]).debug
    assert not parse(["verify", "ck"]).debug

    def boom(args):
        raise ValueError("boom")

    monkeypatch.setattr(cli, "cmd_make_tiny", boom)
    with pytest.raises(ValueError, match="boom"):
        main(["make-tiny", "d", "--debug"])
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"llama3-harness {harness.__version__}\n"


# ---- 12. the summary line says what the bound is ---------------------------------------------------------------------


def test_summary_says_what_the_bound_is_beyond_five_floors(tmp_path):
    ref, b = oracle_pair(tmp_path, "bfloat16", "bfloat16")
    c = compare_traces(ref, b)
    assert "bound = 5 x (pooled floor + 0.25 u) x small-sample tail" in summary_line(c)
    r = c.result("norm")
    assert r.bound > 5 * r.pooled_floor, "the tail and the ulp term make the bound more than 5 floors"


# ---- 13. --generate: the prompt's tokens, the bound on steps.png, near ties ------------------------------------------


def test_generate_prints_the_prompt_tokens_and_explains_a_near_tie(tmp_path, monkeypatch, capsys):
    x = torch.randn(len(TOKENS), 8, dtype=torch.float64)
    c = compare_traces(write_trace(tmp_path / "a.h5", {"norm": x}), write_trace(tmp_path / "b.h5", {"norm": x}))
    result = SimpleNamespace(
        comparison=c,
        steps=[dict(step=0, first_divergence=None, passed=1, names=1, worst_ratio=0.0)],
        cache_check=[],
        reference_text=" a b",
        implementation="scratch",
        implementation_text=" a c",
        reference_generated=[10, 11, 12],
        implementation_generated=[10, 11, 13],
        unexplained=[],
        replaced=[],
        out=tmp_path,
        passed=True,
    )
    monkeypatch.setattr("harness.verify.verify", lambda *args, **kwargs: result)
    assert main(["verify", "ck", "--generate", "1"]) == 0
    out = capsys.readouterr().out
    assert "greedy tokens differ at step 2: near ties" in out and "rounding, not a divergence" in out
    assert f"prompt: {len(TOKENS) - 1} tokens + 1 decode steps; traces" in out
    result.unexplained = ["step 2: reference 12, implementation 13; the oracle puts them 3 apart"]
    assert generation_lines(result)[-1] == "greedy tokens differ beyond rounding at " + result.unexplained[0]


def test_generate_steps_plot_draws_the_bound(tmp_path, monkeypatch):
    from harness import plots

    x = torch.randn(len(TOKENS), 8, dtype=torch.float64)
    names = {f"steps.{s}.logits": x[s : s + 1] for s in range(2)}
    c = compare_traces(write_trace(tmp_path / "a.h5", names), write_trace(tmp_path / "b.h5", names))
    saved = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.append(fig))
    assert plots.plot_steps(c, tmp_path / "steps.png")
    styles = [line.get_linestyle() for line in saved[0].axes[0].lines]
    assert "--" in styles, f"no dashed bound line among {styles}"


# ---- 14. --help ------------------------------------------------------------------------------------------------------


def _help(capsys, *command: str) -> str:
    assert main([*command, "--help"]) == 0
    return capsys.readouterr().out


def test_help_gives_defaults_and_says_what_each_option_is(capsys):
    top = _help(capsys)
    assert "argparse" not in top and "library functions" not in top and "Exit codes" in top
    assert "(default: float32)" in _help(capsys, "verify") and "(default: float32)" in _help(capsys, "trace")
    assert "seed of the random weights" in _help(capsys, "make-tiny")
    synopsis = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for shown in ("--generate", "--golden-dir", "verify tiny --impl reference", "--llama3-generate", "example"):
        assert shown in synopsis, f"the command synopsis lacks {shown}"


# ---- 15. a long prompt's attention map -------------------------------------------------------------------------------


def test_long_prompt_attention_map_is_cut_to_readable_cells():
    import numpy as np

    n, rows = 1903, list(np.linspace(0, 1902, 64).round().astype(int))
    probs = np.random.default_rng(0).random((64, n))
    probs /= probs.sum(-1, keepdims=True)  # each row's attention sums to 1
    labels = [f"t{i}" for i in range(n)]
    shown, keys, queries, width = _readable(probs, rows, labels)
    assert shown.shape[1] == len(keys) <= MAX_CELLS and shown.shape[0] == len(queries) <= MAX_CELLS
    assert np.allclose(shown.sum(-1), 1.0), "blocks of keys keep each row's attention mass"
    assert width > 1 and keys[1] == str(width) and queries[-1] == "1902:t1902"
    short, keys, queries, width = _readable(probs[:17, :17], list(range(17)), labels[:17])
    assert width == 1 and keys == labels[:17] == queries and short.shape == (17, 17)


# ---- 16. installing, and the starter file ----------------------------------------------------------------------------


def test_the_starter_file_ships_in_the_package_and_is_the_example(tmp_path, capsys, monkeypatch):
    example = ROOT / "examples" / "my_llama.py"  # a link to the packaged file: one source, shipped in the wheel
    assert example.resolve() == (ROOT / "harness" / "data" / "my_llama.py").resolve()
    source = example.read_text(encoding="utf-8")
    assert '"data/*.py"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["example", "my_llama.py"]) == 0 and (tmp_path / "my_llama.py").read_text() == source
    assert main(["example", "my_llama.py"]) == 2 and "already exists" in capsys.readouterr().err


def test_installing_says_how_without_the_package_index_and_for_a_cpu_only_machine():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install = readme[readme.index("## Install") : readme.index("## Verify your own")]
    assert "git+" in install and "--index-url https://download.pytorch.org/whl/cpu" in install
    assert not re.search(r"pip install llama3-harness\b", readme)


# ---- 17. make-tiny ---------------------------------------------------------------------------------------------------


def test_make_tiny_refuses_a_negative_seed_and_writes_an_8b_wide(monkeypatch, capsys, tmp_path):
    assert main(["make-tiny", str(tmp_path / "d"), "--seed", "-1"]) == 2
    assert "argument --seed: expected a whole number, 0 or more, got '-1'" in capsys.readouterr().err
    monkeypatch.setattr("harness.tiny.make_tiny", lambda *args, **kwargs: None)
    assert main(["make-tiny", "d", "--shape", "8b-wide"]) == 0
    assert capsys.readouterr().out.startswith("wrote an 8b-wide Llama-3.0 checkpoint")


# ---- issue 18: functions that fit a screen ---------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["cli", "report", "plots", "verify", "progress", "comparable"])
def test_functions_fit_a_screen(module):
    tree = ast.parse((ROOT / "harness" / f"{module}.py").read_text(encoding="utf-8"))
    long = {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 50
    }
    assert not long, f"harness/{module}.py: functions over 50 lines: {long}"
