"""`python -m harness gguf CHECKPOINT --out MODEL.gguf`: a checkpoint written as a GGUF for `--impl llamacpp:` by
llama.cpp's own convert_hf_to_gguf.py (f32, bf16, f16, q8_0), and q4_k_m by llama.cpp's quantizer (docs/ports.md).

The script is not on the package index: it ships in llama.cpp's repository and in llama-cpp-python's sdist
(vendor/llama.cpp/). It refuses a tokenizer whose pre-tokenizer hash it does not know (the tiny checkpoints'): told
"llama-bpe" (Llama-3's) then, only after the tokenizer's split regex was checked to be Llama-3's.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import open_checkpoint
from .errors import HarnessError
from .tokenizer import PAT_STR

SCRIPT = "convert_hf_to_gguf.py"
CONVERTER_ENV = "LLAMA_CPP_CONVERTER"  # the default of --converter
GET_IT = (
    f"pass --converter PATH (or set ${CONVERTER_ENV}): llama.cpp's {SCRIPT}, a llama.cpp clone, or llama-cpp-python's "
    f"sdist (`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`: the .tar.gz as it is)"
)
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15
FILE_TYPES = {"f32": 0, "bf16": 32, "f16": 1, "q8_0": 7, "q4_k_m": LLAMA_FTYPE_MOSTLY_Q4_K_M}  # general.file_type

# Run in a child process, so that the two changes stay there: the pre-tokenizer's name when the converter knows not
# the tokenizer's hash (its split regex was checked to be Llama-3's first), and, for the tests only, q/k rows left in
# Hugging Face's order (a mis-converted GGUF).
DRIVER = """
import os, runpy, sys
script, broken, args = sys.argv[1], sys.argv[2] == "broken-qk", sys.argv[3:]
folder = os.path.dirname(os.path.abspath(script))
sys.path[:0] = [folder, os.path.join(folder, "gguf-py")]
from conversion import base, llama
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:  # an unknown hash: the split regex is Llama-3's (checked by the harness)
        return "llama-bpe"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
if broken:
    llama.LlamaModel.permute = staticmethod(lambda weights, n_head, n_head_kv: weights)
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""


def write_gguf(
    checkpoint: str | Path, out: str | Path, *, outtype: str, converter: str | Path | None = None, broken_qk=False
) -> Path:
    """`checkpoint` (Meta's format or Hugging Face's) written to the new file `out` as a GGUF of `outtype`.
    `broken_qk`: q/k rows not permuted back to Meta's order, a mis-converted GGUF for the tests."""
    if outtype not in FILE_TYPES:
        raise HarnessError(f"--outtype {outtype}: choose one of {', '.join(FILE_TYPES)}")
    out = Path(out)
    if out.exists() or not out.parent.is_dir():
        why = "exists: choose a new file" if out.exists() else f"its folder {out.parent} does not exist"
        raise HarnessError(f"{out}: {why}")
    ckpt = open_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp, find_script(converter) as script:
        hf = hf_folder(ckpt, Path(tmp))
        check_split_regex(hf)
        first = Path(tmp) / "model-f32.gguf" if outtype == "q4_k_m" else Path(tmp) / out.name
        run_converter(script, hf, first, "f32" if outtype == "q4_k_m" else outtype, ckpt.path.name, broken_qk)
        if outtype == "q4_k_m":
            quantize(first, Path(tmp) / out.name, LLAMA_FTYPE_MOSTLY_Q4_K_M)
        os.replace(Path(tmp) / out.name, out)
    return out


def judged_with(outtype: str) -> str:
    """The --dtype a GGUF of `outtype` is judged with (harness/llamacpp.py's rule)."""
    from .llamacpp import dtype_for

    return dtype_for(FILE_TYPES[outtype])[1]


def hf_folder(ckpt, tmp: Path) -> Path:
    """The checkpoint in Hugging Face's layout, what the converter reads: itself, or converted into `tmp`."""
    if ckpt.format == "hf":
        return ckpt.path
    from .convert import convert

    convert(ckpt.path, tmp / "hf", to="hf")
    return tmp / "hf"


def check_split_regex(hf: Path) -> None:
    """The tokenizer splits text with Llama-3's regex (so that llama.cpp's "llama-bpe" pre-tokenizer is its own)."""
    path = hf / "tokenizer.json"
    try:
        pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    except (OSError, ValueError) as e:
        raise HarnessError(f"{path}: cannot read the tokenizer ({e})") from None
    found = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", [pre]) if p.get("type") == "Split"]
    if found != [PAT_STR]:
        raise HarnessError(
            f"{path}: its pre-tokenizer splits with {found[0] if found else 'no regex'!r}, not Llama-3's: the "
            f"converter's 'llama-bpe' would not be this tokenizer"
        )


@contextmanager
def find_script(converter: str | Path | None):
    """llama.cpp's convert_hf_to_gguf.py from `converter` (or $LLAMA_CPP_CONVERTER): the script, a folder holding it
    (at its top or in vendor/llama.cpp/), or llama-cpp-python's sdist .tar.gz (unpacked into a temporary folder)."""
    given = converter or os.environ.get(CONVERTER_ENV)
    if not given:
        raise HarnessError(f"python -m harness gguf needs llama.cpp's {SCRIPT}: {GET_IT}")
    path = Path(given)
    if path.is_file() and path.name.endswith(".tar.gz"):
        with tempfile.TemporaryDirectory(prefix="harness-llama-cpp-") as tmp:
            yield _unpack(path, Path(tmp))
        return
    for candidate in (path, path / SCRIPT, path / "vendor" / "llama.cpp" / SCRIPT):
        if candidate.is_file() and candidate.name == SCRIPT:
            yield candidate
            return
    raise HarnessError(f"{path}: no {SCRIPT} there; {GET_IT}")


def _unpack(sdist: Path, tmp: Path) -> Path:
    """The converter (its script, conversion/ and gguf-py/) out of llama-cpp-python's sdist."""
    try:
        with tarfile.open(sdist) as tar:
            top = tar.getnames()[0].split("/")[0]
            inside = f"{top}/vendor/llama.cpp/"
            wanted = [
                m for m in tar.getmembers() if m.name.startswith(inside) and _converter_part(m.name[len(inside) :])
            ]
            tar.extractall(tmp, members=wanted, filter="data")
    except (OSError, tarfile.TarError) as e:
        raise HarnessError(f"{sdist}: cannot read the sdist ({e})") from None
    script = tmp / inside / SCRIPT
    if not script.is_file():
        raise HarnessError(f"{sdist}: no vendor/llama.cpp/{SCRIPT} in it; {GET_IT}")
    return script


def _converter_part(name: str) -> bool:
    return name == SCRIPT or name.startswith(("conversion/", "gguf-py/"))


def run_converter(script: Path, hf: Path, out: Path, outtype: str, name: str, broken_qk: bool) -> None:
    """The converter in a child process of this Python; its log kept, its last lines shown if it fails."""
    command = [sys.executable, "-c", DRIVER, str(script), "broken-qk" if broken_qk else "-", str(hf)]
    command += ["--outfile", str(out), "--outtype", outtype, "--model-name", name]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {done.returncode}"
        raise HarnessError(f"{script} failed on {hf}: {last}")


def quantize(source: Path, out: Path, ftype: int) -> None:
    """`source` (an F32 or BF16 GGUF) quantized by llama.cpp's own quantizer into `out`."""
    from .llamacpp import import_llama_cpp, quiet

    lib = import_llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype
    with quiet():
        status = lib.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0 or not out.is_file():
        raise HarnessError(f"{source}: llama.cpp's quantizer returned {status}")
