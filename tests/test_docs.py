"""The README and docs/ say what the code does: links resolve, commands parse with the real CLI, pytest options exist.

The slow tests run the README's quick start and its sample of `verify` catching a bug, and check what they print.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import pytest_plugin
from harness.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 170  # the "about 150", with room for one more example
# Options of pytest itself and of pytest-xdist that the docs show beside the plugin's.
PYTEST_OWN_OPTIONS = {"-n", "-m", "-k", "-q", "-x", "-v", "-p", "--dist", "--help"}
# Files whose text may point at a docs page or a README section (error messages, comments, docstrings).
POINTERS = [*sorted((ROOT / "harness").glob("*.py")), *sorted((ROOT / "examples").glob("*.py"))]

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _blocks(text: str) -> list[tuple[str, str]]:
    """Fenced code blocks as (language, body)."""
    return FENCE.findall(text)


def _prose(text: str) -> str:
    """The text outside fenced code blocks (where links and headings live)."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (markdown marks too), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> Iterator[str]:
    """The anchors of a page's headings, a repeated one numbered as GitHub does (`-1`, `-2`, ...)."""
    seen: dict[str, int] = {}
    for heading in HEADING.findall(_prose(path.read_text(encoding="utf-8"))):
        slug = _slug(heading)
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def _command_lines() -> list[tuple[str, str]]:
    """(where, line) of every command line shown: lines of sh/console blocks (a console's only after `$ `) and
    inline code spans that start with a command."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for lang, body in _blocks(text):
            if lang not in ("sh", "console"):
                continue
            for line in body.splitlines():
                if lang == "console":
                    if not line.startswith("$ "):
                        continue
                    line = line[2:]
                found.append((_rel(page), line))
        for span in re.findall(r"`([^`\n]+)`", _prose(text)):
            found.append((_rel(page), span))
    return found


def _harness_commands() -> list[tuple[str, str]]:
    return [(where, line) for where, line in _command_lines() if re.match(r"\s*python -m harness \S", line)]


def _pytest_commands() -> list[tuple[str, str]]:
    return [(where, line) for where, line in _command_lines() if re.match(r"\s*pytest\b", line)]


def _ids(commands: list[tuple[str, str]]) -> list[str]:
    return [f"{where}-{i}" for i, (where, _) in enumerate(commands)]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_at_existing_files_and_headings(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target} (no file {path})")
        elif anchor and path.suffix == ".md" and anchor not in set(_anchors(path)):
            broken.append(f"{target} (no heading with anchor #{anchor} in {_rel(path)})")
    assert not broken, f"{_rel(page)}: broken links: " + "; ".join(broken)


def test_readme_stays_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, at most {README_MAX_LINES}: move detail into docs/"


def test_docs_show_commands_of_every_kind():
    """The extraction below finds what it checks (an empty list would pass every parametrized case vacuously)."""
    harness_commands = {shlex.split(line, comments=True)[3] for _, line in _harness_commands()}
    assert {"make-tiny", "verify", "trace", "compare", "convert", "golden"} <= harness_commands
    assert len(_pytest_commands()) >= 5


@pytest.mark.parametrize("where, line", _harness_commands(), ids=_ids(_harness_commands()))
def test_harness_command_parses_with_the_real_parser(where, line):
    args = shlex.split(line, comments=True)[3:]  # after "python -m harness"
    try:
        build_parser().parse_args(args)
    except SystemExit as e:  # --help exits 0; a usage error 2
        if e.code != 0:
            pytest.fail(f"{where}: `{line.strip()}` is not accepted by the CLI (exit {e.code})")


def _plugin_flags(monkeypatch) -> set[str]:
    """Every flag harness/pytest_plugin.py registers, the short spellings of this checkout included."""

    class Options:
        def __init__(self):
            self.flags: set[str] = set()

        def addini(self, *args, **kwargs):
            pass

        def getgroup(self, *args, **kwargs):
            return self

        def addoption(self, *flags, **kwargs):
            self.flags.update(flags)

    monkeypatch.chdir(ROOT)  # the short spellings (--checkpoint ...) exist inside this checkout
    options = Options()
    pytest_plugin.pytest_addoption(options)
    return options.flags


@pytest.mark.parametrize("where, line", _pytest_commands(), ids=_ids(_pytest_commands()))
def test_pytest_options_shown_are_registered(where, line, monkeypatch):
    known = _plugin_flags(monkeypatch) | PYTEST_OWN_OPTIONS
    shown = [arg.split("=")[0] for arg in shlex.split(line, comments=True)[1:] if arg.startswith("-")]
    unknown = [flag for flag in shown if flag not in known]
    assert not unknown, f"{where}: `{line.strip()}` shows options the plugin does not register: {unknown}"


def test_code_points_at_docs_and_readme_sections_that_exist():
    """Error messages, comments and docstrings that say `docs/PAGE.md` or `README: SECTION` point somewhere real."""
    readme_sections = {h.strip("`") for h in HEADING.findall(_prose(README.read_text(encoding="utf-8")))}
    broken = []
    for source in POINTERS:
        text = source.read_text(encoding="utf-8")
        for page in re.findall(r"docs/[\w\-]+\.md", text):
            if not (ROOT / page).exists():
                broken.append(f"{_rel(source)}: {page}")
        for section in re.findall(r"README: \"?([A-Z][\w ]*[\w])", text):
            if section not in readme_sections:
                broken.append(f"{_rel(source)}: README section {section!r}")
    assert not broken, "pointers to missing docs: " + "; ".join(broken)


# ---- slow: the README's commands, run --------------------------------------------------------------------------------


def _section(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _run_harness(line: str, cwd: Path) -> subprocess.CompletedProcess:
    args = shlex.split(line, comments=True)[3:]
    return subprocess.run(
        [sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def _assert_shape(shown: list[str], printed: str) -> None:
    """Each line the README shows is printed, up to its first number or quoted token (those vary by machine)."""
    lines = printed.splitlines()
    for line in shown:
        stem = re.split(r"[\d']", line, maxsplit=1)[0]
        assert any(p.startswith(stem) for p in lines), f"the README shows {line!r}; printed:\n{printed}"


@pytest.mark.slow
def test_readme_quick_start_runs_and_prints_what_the_readme_shows(tmp_path):
    demo = _section("Install and a one-minute demo")
    (_, commands), (_, output) = [b for b in _blocks(demo) if b[0] in ("sh", "text")][:2]
    harness_lines = [line for line in commands.splitlines() if line.startswith("python -m harness")]
    assert [shlex.split(line, comments=True)[3] for line in harness_lines] == ["make-tiny", "verify"]
    for line in harness_lines:
        done = _run_harness(line, tmp_path)
        assert done.returncode == 0, f"`{line}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    shown = output.splitlines()
    _assert_shape(shown, done.stdout)
    passed = re.search(r"^PASS: (\d+)/(\d+) names within bound", done.stdout, re.M)
    assert passed and passed[1] == passed[2], done.stdout
    assert (tmp_path / "demo" / "report.html").is_file()


@pytest.mark.slow
def test_readme_sample_of_verify_catching_a_bug_is_what_verify_prints(tmp_path):
    """The README's opening sample: examples/my_llama.py with rope_theta hard-coded to 10000 (docs/debugging.md)."""
    (_, sample) = next(b for b in _blocks(README.read_text(encoding="utf-8")) if b[0] == "console")
    command, *shown = sample.splitlines()
    shown = [line for line in shown if line != "..." and not line.startswith("$ ")]
    source = (ROOT / "examples" / "my_llama.py").read_text(encoding="utf-8")
    assert source.count("config.rope_theta **") == 1
    (tmp_path / "bug.py").write_text(source.replace("config.rope_theta **", "10000.0 **"), encoding="utf-8")
    assert _run_harness("python -m harness make-tiny tiny", tmp_path).returncode == 0
    done = _run_harness(command.removeprefix("$ "), tmp_path)
    assert done.returncode == 1, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    _assert_shape(shown, done.stdout)
    first = next(line for line in shown if line.startswith("first divergence:")).split()[2]
    assert f"first divergence: {first} " in done.stdout, done.stdout
