"""Golden scratch traces of the tiny checkpoints, for CI regression gating.

`golden/recipe.json` says what to make; `python -m harness golden --update` writes the traces and `manifest.json`
(sha256, format version, library versions); `python -m harness golden` and `tests/test_golden.py` check today's
forward against them. Tests never write here.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import open_checkpoint
from .compare import Comparison, compare_traces
from .errors import HarnessError
from .files import atomic_path
from .tiny import make_tiny_once
from .trace_file import FORMAT_VERSION, READABLE_VERSIONS, library_versions

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden"

# Tight bounds (relative L2 per name, direct comparison with the golden trace: rel_l2 <= rtol + atol sqrt(n) / ||A||):
# only float differences across CPUs may pass. Measured (docs/golden.md#the-bounds, 2026-11-29, torch 2.13.0): the
# scratch forward and examples/my_llama.py on tiny 3.0/3.1/3.2, traced under other CPU code paths than this AVX512
# machine's (ATen/MKL/oneDNN limited to AVX2 as on GitHub's runners, to SSE4, MKL_CBWR=COMPATIBLE, 1 thread) and
# compared with the default trace: worst rel_l2 float32 3.0e-6, bfloat16 1.1e-2 (oneDNN's AVX2 bf16 matmul against
# AVX512-BF16's), float16 1.4e-3, float64 7.8e-7 (my_llama.py keeps RoPE and softmax in float32, as the notebook; the
# scratch forward: 6.4e-15). Largest ratio under these bounds 0.31 (3x headroom); thread counts changed nothing.
GOLDEN_RTOL = {"float32": 1e-5, "float64": 1e-5, "bfloat16": 3e-2, "float16": 5e-3}
GOLDEN_ATOL = {"float32": 1e-7, "float64": 1e-7, "bfloat16": 1e-3, "float16": 5e-4}


@dataclass(frozen=True)
class Entry:
    variant: str
    seed: int
    dtype: str

    @property
    def file(self) -> str:
        return f"tiny-{self.variant}-seed{self.seed}-{self.dtype}.h5"

    @property
    def id(self) -> str:
        return f"tiny-{self.variant}-seed{self.seed}-{self.dtype}"


def read_recipe(golden_dir: Path = GOLDEN_DIR) -> tuple[str, list[Entry]]:
    path = Path(golden_dir) / "recipe.json"
    try:
        recipe = json.loads(path.read_text())
        return recipe["prompt"], [Entry(e["variant"], int(e["seed"]), e["dtype"]) for e in recipe["traces"]]
    except FileNotFoundError:
        raise HarnessError(
            f"{path}: golden recipe not found (the harness's own golden/, in a source checkout; for your "
            f"implementation: python -m harness golden record / check, docs/golden.md)"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HarnessError(f"{path}: not a valid golden recipe ({e})") from None


def read_manifest(golden_dir: Path = GOLDEN_DIR) -> dict:
    path = Path(golden_dir) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HarnessError(f"{path}: no golden manifest; run `python -m harness golden --update`") from None
    except json.JSONDecodeError as e:
        raise HarnessError(f"{path}: not valid JSON ({e})") from None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def trace_entry(entry: Entry, prompt: str, out: Path, tiny_root: Path) -> Path:
    from .run import trace_scratch

    trace_scratch(
        open_checkpoint(make_tiny_once(tiny_root, entry.variant, entry.seed)), out, prompt=prompt, dtype=entry.dtype
    )
    return out


def update(golden_dir: Path = GOLDEN_DIR) -> list[Path]:
    """Rewrite every golden trace and the manifest (each file atomically); the only writer of golden/."""
    golden_dir = Path(golden_dir)
    prompt, entries = read_recipe(golden_dir)
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for entry in entries:
            path = trace_entry(entry, prompt, Path(tmp) / entry.file, Path(tmp) / "tiny")
            ckpt = open_checkpoint(make_tiny_once(Path(tmp) / "tiny", entry.variant, entry.seed))
            files[entry.file] = dict(
                sha256=sha256(path),
                variant=entry.variant,
                seed=entry.seed,
                dtype=entry.dtype,
                checkpoint=ckpt.fingerprint(),
                checkpoint_sha256=sha256(ckpt.path / "consolidated.00.pth"),
            )
        for entry in entries:
            with atomic_path(golden_dir / entry.file) as target:
                shutil.copyfile(Path(tmp) / entry.file, target)
    manifest = dict(
        format_version=FORMAT_VERSION,
        produced_by="python -m harness golden --update",
        updated=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.machine()} {platform.processor()}".strip(),
        library_versions=library_versions(),
        prompt=prompt,
        files=files,
    )
    with atomic_path(golden_dir / "manifest.json") as target:
        target.write_text(json.dumps(manifest, indent=1) + "\n")
    return [golden_dir / e.file for e in entries]


def check_entry(
    entry: Entry, work_dir: Path, golden_dir: Path = GOLDEN_DIR, *, tiny_root: Path | None = None
) -> Comparison:
    """Today's scratch trace of `entry` against its golden trace, under the tight golden bound."""
    golden_dir = Path(golden_dir)
    manifest = read_manifest(golden_dir)
    prompt, _ = read_recipe(golden_dir)
    golden = golden_dir / entry.file
    recorded = manifest.get("files", {}).get(entry.file)
    if recorded is None or not golden.exists():
        raise HarnessError(f"{golden}: missing from golden/; run `python -m harness golden --update`")
    if sha256(golden) != recorded["sha256"]:
        raise HarnessError(
            f"{golden}: sha256 differs from manifest.json (changed outside `python -m harness golden --update`)"
        )
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise HarnessError(
            f"{golden_dir / 'manifest.json'}: golden traces are format {manifest.get('format_version')}, "
            f"this harness reads {READABLE_VERSIONS}; run `python -m harness golden --update`"
        )
    tiny_root = Path(tiny_root or work_dir / "tiny")
    ckpt = open_checkpoint(make_tiny_once(tiny_root, entry.variant, entry.seed))
    if ckpt.fingerprint() != recorded["checkpoint"]:
        raise HarnessError(
            f"{golden}: the tiny {entry.variant} checkpoint generator changed (fingerprint differs); "
            f"run `python -m harness golden --update` if intended"
        )
    today = Path(work_dir) / entry.file
    if not today.exists():
        trace_entry(entry, prompt, today, tiny_root)
    return compare_traces(golden, today, rtol=GOLDEN_RTOL[entry.dtype], atol=GOLDEN_ATOL[entry.dtype])
