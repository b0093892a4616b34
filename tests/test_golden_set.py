"""A user's golden set (harness/golden_set.py, docs/golden.md): record once against the reference, then gate later
commits without it.

The fast tests build their set as `record` writes it but with the verification left out (the trace judged against
itself), so no reference runs; the slow ones record for real, from a fresh directory outside the repository, and run
docs/ci-workflow.yml's steps there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import golden_set
from harness.checkpoint import open_checkpoint
from harness.cli import build_parser, main
from harness.golden import GOLDEN_ATOL, GOLDEN_RTOL
from harness.run import DEFAULT_PROMPT, make_run
from tests.helpers import record_without_reference

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "my_llama.py"
WORKFLOW = ROOT / "docs" / "ci-workflow.yml"

# Deliberate changes to examples/my_llama.py, and the first name each must fail at.
CHANGES = {
    "eps": ("+ eps)", "+ eps * 10)", "layers.0.attention_norm"),
    "ffn": ("ffn = hidden @", "ffn = 1.01 * hidden @", "layers.0.feed_forward.output"),
}


def changed_example(folder: Path, change: str) -> Path:
    old, new, _ = CHANGES[change]
    source = EXAMPLE.read_text()
    assert old in source, f"examples/my_llama.py no longer has {old!r}: update CHANGES"
    path = folder / f"my_llama_{change}.py"
    path.write_text(source.replace(old, new))
    return path


@pytest.fixture(scope="module")
def user(tmp_path_factory, tiny_checkpoint):
    """A user's folder: my_llama.py, a tiny checkpoint made by make-tiny (with its tiny.json), a golden set of it."""
    root = tmp_path_factory.mktemp("user")
    shutil.copy(EXAMPLE, root / "my_llama.py")
    shutil.copytree(tiny_checkpoint("3.0"), root / "tiny")
    record_without_reference(root / "golden", f"{root / 'my_llama.py'}:forward", root / "tiny")
    return root


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- the set ---------------------------------------------------------------------------------------------------------


def test_the_set_describes_itself(user):
    golden = golden_set.read(user / "golden")
    data = json.loads((user / "golden" / "golden.json").read_text())
    ckpt = open_checkpoint(user / "tiny")
    assert golden.checkpoint_fingerprint == ckpt.fingerprint() == data["checkpoint"]["fingerprint"]
    assert golden.checkpoint_path == str((user / "tiny").resolve())
    assert golden.tiny == {"variant": "3.0", "seed": 0, "format": "meta", "shape": "tiny"}
    assert golden.tokens == make_run(ckpt).tokens and golden.prompt == DEFAULT_PROMPT
    assert (golden.dtype, golden.device, golden.implementation) == ("float32", "cpu", f"{user / 'my_llama.py'}:forward")
    assert (golden.rtol, golden.atol) == (GOLDEN_RTOL["float32"], GOLDEN_ATOL["float32"])
    assert {"torch", "h5py", "transformers", "tiktoken", "harness"} <= set(golden.library_versions)
    assert data["bounds"]["source"].startswith("harness/golden.py") and data["verification"]["passed"]


def test_check_passes_for_the_recorded_implementation(user, tmp_path):
    result = golden_set.check(user / "golden", f"{user / 'my_llama.py'}:forward", work_dir=tmp_path)
    assert result.passed and result.comparison.passed and result.comparison.mode == "direct", result.comparison
    assert result.checkpoint_source == "recorded path" and result.missing == []
    assert max(r.rel_l2 for r in result.comparison.results) == 0.0, "same machine, same code: bit-identical"
    impl, ckpt = f"{user / 'my_llama.py'}:forward", (user / "tiny").resolve()
    assert result.rewrite_command == (
        f"python -m harness golden record --impl {impl} --checkpoint {ckpt} --dtype float32 --out {user / 'golden'}"
    )


@pytest.mark.parametrize("change", CHANGES)
def test_a_changed_implementation_fails_at_its_first_divergence(user, tmp_path, capsys, change):
    """Exit 1; the first divergence is where the change is; the command that rewrites the set after review."""
    bug = changed_example(tmp_path, change)
    code, out, err = run_cli(capsys, "golden", "check", user / "golden", "--impl", f"{bug}:forward")
    assert code == 1 and err == "", err
    assert f"first divergence: {CHANGES[change][2]}:" in out, out
    assert f"  python -m harness golden record --impl {bug}:forward --checkpoint " in out, out
    assert "(transformers not imported)" in out or "transformers imported by" in out, out


def test_the_checkpoint_moved_needs_checkpoint(tmp_path, capsys, user):
    """Not a make-tiny checkpoint (no tiny.json): once moved, --checkpoint says where it is now."""
    shutil.copytree(user / "tiny", tmp_path / "ckpt", ignore=shutil.ignore_patterns("tiny.json"))
    record_without_reference(tmp_path / "golden", f"{user / 'my_llama.py'}:forward", tmp_path / "ckpt")
    (tmp_path / "ckpt").rename(tmp_path / "moved")
    code, out, err = run_cli(capsys, "golden", "check", tmp_path / "golden", "--work-dir", tmp_path / "w")
    assert code == 2 and err.startswith(f"error: {(tmp_path / 'ckpt').resolve()}: the checkpoint the golden set"), err
    assert err.count("\n") == 1 and err.rstrip().endswith("pass --checkpoint DIR"), err
    code, out, err = run_cli(capsys, "golden", "check", tmp_path / "golden", "--checkpoint", tmp_path / "moved")
    assert code == 0 and "(--checkpoint)" in out and "PASS: 222/222" in out, out + err


def test_another_checkpoint_is_refused_by_its_fingerprint(user, tiny_checkpoint, capsys):
    other = tiny_checkpoint("3.1")
    code, _, err = run_cli(capsys, "golden", "check", user / "golden", "--checkpoint", other)
    assert code == 2 and "checkpoint fingerprint" in err and "not the checkpoint" in err and err.count("\n") == 1, err


def test_a_tiny_checkpoint_gone_is_made_again_from_its_recipe(user, tmp_path):
    shutil.copytree(user / "tiny", tmp_path / "tiny")
    record_without_reference(tmp_path / "golden", f"{user / 'my_llama.py'}:forward", tmp_path / "tiny")
    shutil.rmtree(tmp_path / "tiny")
    result = golden_set.check(tmp_path / "golden", f"{user / 'my_llama.py'}:forward", work_dir=tmp_path / "w")
    assert result.passed and result.checkpoint_source == "remade from its make-tiny recipe", result.comparison
    assert result.checkpoint == tmp_path / "w" / "tiny"
    assert result.rewrite_command.startswith("python -m harness make-tiny tiny --variant 3.0 --seed 0 && "), result
    again = golden_set.check(tmp_path / "golden", f"{user / 'my_llama.py'}:forward", work_dir=tmp_path / "w")
    assert again.passed and again.checkpoint == result.checkpoint, "the remade tiny is reused (a CI cache keeps it)"


def test_check_does_not_import_transformers(user, tmp_path):
    """The gate's whole path, in a fresh interpreter: the reference and transformers are never imported."""
    code = (
        "import sys\n"
        "from harness.cli import main\n"
        f"code = main(['golden', 'check', {str(user / 'golden')!r}, '--work-dir', {str(tmp_path)!r}])\n"
        "assert code == 0, code\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        "assert 'harness.reference' not in sys.modules, 'the reference was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(transformers not imported)" in done.stdout, done.stdout


# ---- bad input: exit 2, one line ------------------------------------------------------------------------------------


def _broken(user: Path, tmp_path: Path, how: str) -> Path:
    golden = tmp_path / "golden"
    shutil.copytree(user / "golden", golden)
    if how == "json":
        (golden / "golden.json").write_text("{")
    elif how == "trace":
        with open(golden / "implementation.h5", "ab") as f:
            f.write(b"\0")
    elif how == "version":
        data = json.loads((golden / "golden.json").read_text())
        (golden / "golden.json").write_text(json.dumps(dict(data, format_version=99)))
    return golden


@pytest.mark.parametrize(
    "how, expected",
    [
        ("missing", "not a golden set (no such directory)"),
        ("json", "golden.json: not a valid golden set"),
        ("version", "golden.json: not a valid golden set (ValueError: format 'llama3-harness golden set' version 99)"),
        ("trace", "implementation.h5: sha256 differs from golden.json (changed outside `golden record`)"),
    ],
)
def test_a_bad_set_is_refused_in_one_line(user, tmp_path, capsys, how, expected):
    golden = tmp_path / "nowhere" if how == "missing" else _broken(user, tmp_path, how)
    code, out, err = run_cli(capsys, "golden", "check", golden, "--impl", f"{user / 'my_llama.py'}:forward")
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err, err


def test_bad_arguments_are_refused_before_any_work(user, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("mine")
    cases = [
        (["golden", "check", user / "golden", "--impl", tmp_path / "none.py:forward"], "none.py not found"),
        (["golden", "record", "--impl", "x.py:f", "--checkpoint", user / "tiny", "--out", tmp_path / "notes"], "not a"),
        (
            ["golden", "record", "--impl", "x.py:f", "--checkpoint", tmp_path / "no", "--out", tmp_path / "g"],
            "not found",
        ),
        (["golden", "--update", "check", user / "golden"], "golden --update rewrites the harness's own golden/"),
    ]
    for argv, expected in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and err.startswith("error: ") and expected in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "g").exists() and sorted(os.listdir(tmp_path / "notes")) == ["README"]


def test_golden_without_an_action_keeps_its_meaning(tmp_path, capsys):
    """`golden [--update] [--golden-dir DIR]` still checks (or rewrites) the harness's own scratch traces."""
    plain, update = build_parser().parse_args(["golden"]), build_parser().parse_args(["golden", "--update"])
    assert (plain.action, plain.update, update.action, update.update) == (None, False, None, True)
    assert plain.golden_dir == str(ROOT / "golden")
    code, _, err = run_cli(capsys, "golden", "--golden-dir", tmp_path)
    assert code == 2 and err.startswith(f"error: {tmp_path / 'recipe.json'}: golden recipe not found"), err


# ---- the real thing: the reference at record time, a fresh directory, the CI workflow's steps ------------------------


def sh(command: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """A step as GitHub runs it (`bash -e`), `python` being this environment's."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = dict(os.environ, PATH=path, **(env or {}))
    return subprocess.run(["bash", "-e", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A fresh directory outside the repository, my_llama.py in it, the set recorded as the README says."""
    root = tmp_path_factory.mktemp("fresh")
    assert not root.resolve().is_relative_to(ROOT)
    shutil.copy(EXAMPLE, root / "my_llama.py")
    done = sh("python -m harness make-tiny tiny", root)
    assert done.returncode == 0, done.stderr
    done = sh("python -m harness golden record --impl my_llama.py:forward --checkpoint tiny --out golden", root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verified against the reference: PASS" in done.stdout, done.stdout
    return root


def on_another_machine(repo: Path) -> Path:
    """A copy of the user's folder as a CI runner sees it: no tiny checkpoint, and the path where the set was recorded
    is another machine's (golden.json names it; its sha256 covers the trace, not this)."""
    shutil.rmtree(repo / "tiny", ignore_errors=True)
    description = json.loads((repo / "golden" / "golden.json").read_text())
    description["checkpoint"]["path"] = "/home/someone/llama/tiny"
    (repo / "golden" / "golden.json").write_text(json.dumps(description, indent=1))
    return repo


@pytest.mark.slow
def test_record_refuses_an_implementation_the_reference_disagrees_with(recorded, tmp_path):
    source = EXAMPLE.read_text().replace("config.rope_theta **", "10000.0 **")
    assert source != EXAMPLE.read_text()
    (tmp_path / "bug.py").write_text(source)
    done = sh(
        f"python -m harness golden record --impl bug.py:forward --checkpoint {recorded / 'tiny'} --out g", tmp_path
    )
    assert done.returncode == 1 and "first divergence: layers.0.attention.heads.0.q_rotated" in done.stdout, done
    assert "not written: bug.py:forward diverges from the reference" in done.stdout, done.stdout
    assert sorted(os.listdir(tmp_path)) == ["bug.py"], "nothing written, no staging folder left"


@pytest.mark.slow
def test_the_readme_workflow_from_a_fresh_directory(recorded, tmp_path):
    """Recorded as the README says; checked; then a deliberate change fails at its first divergence (exit 1)."""
    shutil.copytree(recorded, tmp_path / "repo")
    repo = tmp_path / "repo"
    done = sh("python -m harness golden check golden --impl my_llama.py:forward", repo)
    assert done.returncode == 0 and "PASS: 222/222" in done.stdout, done.stdout + done.stderr
    on_another_machine(repo)  # the tiny checkpoint made again from the set's recipe
    shutil.copy(changed_example(repo, "ffn"), repo / "my_llama.py")
    done = sh("python -m harness golden check golden --impl my_llama.py:forward", repo)
    assert done.returncode == 1 and "first divergence: layers.0.feed_forward.output:" in done.stdout, done.stdout
    rewrite = "python -m harness make-tiny tiny --variant 3.0 --seed 0 && python -m harness golden record --impl"
    assert rewrite in done.stdout and "(transformers not imported)" in done.stdout, done.stdout


@pytest.mark.slow
def test_the_ci_workflow_runs_in_a_fresh_directory(recorded, tmp_path):
    """docs/ci-workflow.yml's `run:` steps, in order, in a copy of the user's folder as actions/checkout leaves it (no
    tiny checkpoint). Its install step is replaced by this environment, where the harness is installed (editable) with
    its test extra, as the step installs it; the `uses:` steps (checkout, setup-python, cache, upload) are GitHub's.
    Then the same with a deliberate change to my_llama.py: the check step fails first, at the change."""
    import yaml

    from harness.pytest_plugin import OPTIONS

    workflow = yaml.safe_load(WORKFLOW.read_text())
    (job,) = workflow["jobs"].values()
    runs = [s for s in job["steps"] if "run" in s and "pip install" not in s["run"]]
    assert len(runs) == sum("run" in s for s in job["steps"]) - 1, "one install step"
    if "golden" not in OPTIONS:  # the plugin's --llama3-golden not there yet: its step cannot run
        runs = [s for s in runs if "--llama3-golden" not in s["run"]]
    cache = next(s for s in job["steps"] if "actions/cache" in s.get("uses", ""))["with"]["path"]
    env = {k: str(v) for k, v in workflow.get("env", {}).items()}
    for change in (None, "ffn"):
        repo = tmp_path / f"repo-{change}"
        on_another_machine(shutil.copytree(recorded, repo))
        if change:
            shutil.copy(changed_example(repo, change), repo / "my_llama.py")
        outputs = [sh(step["run"], repo, env) for step in runs]
        if change is None:
            assert all(done.returncode == 0 for done in outputs), [d.stdout[-3000:] + d.stderr for d in outputs]
            assert (
                open_checkpoint(repo / cache).fingerprint() == golden_set.read(repo / "golden").checkpoint_fingerprint
            )
            assert "(transformers not imported)" in outputs[0].stdout, outputs[0].stdout
        else:
            failed = next(done for done in outputs if done.returncode != 0)
            assert failed.returncode == 1 and "first divergence: layers.0.feed_forward.output:" in failed.stdout
            assert "python -m harness make-tiny tiny --variant 3.0 --seed 0 && " in failed.stdout, failed.stdout
            assert all(done.returncode == 1 for done in outputs), "the pytest step fails too"
