"""llama.cpp as an implementation (`--impl llamacpp:MODEL.gguf`, harness/llamacpp.py): GGUFs written by llama.cpp's own
converter pass `verify` on every tiny variant, F32 in float32 and BF16 in bfloat16, whole, isolated and generating
through llama.cpp's KV cache; a GGUF whose q/k rows were not permuted back fails at `q`.

Needs llama_cpp (`pip install llama-cpp-python==0.3.36`, a 20-minute compile) and llama.cpp's converter, found through
$LLAMA_CPP_CONVERTER (`tox -e llamacpp` sets both up); without them these tests skip.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.checkpoint import open_checkpoint
from harness.errors import HarnessError
from harness.gguf_convert import CONVERTER_ENV, find_script, write_gguf
from harness.implementation import resolve
from harness.isolation import isolated
from harness.names import canonical_names
from harness.recording import tracing
from harness.run import DEFAULT_PROMPT, prompt_tokens
from harness.trace_file import load_trace
from harness.verify import verify

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python==0.3.36 (tox -e llamacpp)")
if not os.environ.get(CONVERTER_ENV):
    pytest.skip(f"needs ${CONVERTER_ENV}: llama.cpp's converter (tox -e llamacpp)", allow_module_level=True)

pytestmark = pytest.mark.slow  # verify: the reference with its float64 oracle

DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
DOCS = Path(__file__).resolve().parent.parent.parent / "docs" / "ports.md"


@pytest.fixture(scope="session")
def converter():
    """The converter script, unpacked once when $LLAMA_CPP_CONVERTER is the sdist."""
    with find_script(None) as script:
        yield script


@pytest.fixture(scope="session")
def gguf(tiny_checkpoint, converter, tmp_path_factory):
    """gguf(variant, outtype, broken_qk=False) -> the tiny checkpoint converted, made once per session."""
    made = {}

    def get(variant: str = "3.0", outtype: str = "f32", broken_qk: bool = False):
        key = (variant, outtype, broken_qk)
        if key not in made:
            out = tmp_path_factory.mktemp("gguf") / f"tiny-{variant}-{outtype}{'-broken' * broken_qk}.gguf"
            made[key] = write_gguf(
                tiny_checkpoint(variant), out, outtype=outtype, converter=converter, broken_qk=broken_qk
            )
        return made[key]

    return get


def _verdict(result) -> str:
    worst = max(result.comparison.results, key=lambda r: r.ratio)
    return (
        f"first divergence {result.comparison.first_divergence}, largest ratio {worst.ratio:.3g} at {worst.name} "
        f"(report: {result.out / 'report.html'})"
    )


CASES = [(v, t) for v in ("3.0", "3.1", "3.2") for t in ("f32", "bf16")] + [("3.0", "f16")]


@pytest.mark.parametrize("variant, outtype", CASES, ids=[f"{v}-{t}" for v, t in CASES])
def test_a_gguf_passes_in_its_own_dtype(variant, outtype, gguf, tiny_checkpoint, tmp_path, capsys):
    checkpoint = tiny_checkpoint(variant)
    result = verify(checkpoint, out=tmp_path, dtype=DTYPES[outtype], impl=f"llamacpp:{gguf(variant, outtype)}")
    assert result.passed, _verdict(result)
    config = open_checkpoint(checkpoint).config
    every_name = [name for name in canonical_names(config.n_layers, config.n_heads) if name != "tokens"]
    assert [r.name for r in result.comparison.results] == every_name
    assert "note: llama.cpp tokenizes" not in capsys.readouterr().err  # special tokens parsed: the harness's tokens


@pytest.mark.parametrize("variant", ["3.0", "3.1", "3.2"])
def test_q8_0_passes_with_its_weights_held_constant(variant, gguf, tiny_checkpoint, tmp_path):
    """A Q8_0 GGUF against the reference on that file's own dequantized weights (`--weights-from`, docs/quantized.md):
    the implementation's arithmetic is judged, not the quantization."""
    q8 = gguf(variant, "q8_0")
    result = verify(tiny_checkpoint(variant), out=tmp_path, dtype="bfloat16", impl=f"llamacpp:{q8}", weights_from=q8)
    assert result.passed, _verdict(result)
    config = open_checkpoint(tiny_checkpoint(variant)).config
    assert len(result.comparison.results) == len(list(canonical_names(config.n_layers, config.n_heads))) - 1


def test_q_k_rows_left_in_hugging_faces_order_fail_at_q(gguf, tiny_checkpoint, tmp_path):
    """The converter permutes HF's q/k rows back to Meta's interleaved pairs (llama.cpp's RoPE is Meta's): without
    that permutation the projections themselves come out in another order."""
    result = verify(tiny_checkpoint("3.0"), out=tmp_path, impl=f"llamacpp:{gguf('3.0', 'f32', broken_qk=True)}")
    assert result.comparison.first_divergence == "layers.0.attention.heads.0.q", _verdict(result)


@pytest.mark.parametrize("variant", ["3.0", "3.1"])
def test_isolated_writes_the_references_input_into_the_graph(variant, gguf, tiny_checkpoint, tmp_path):
    result = verify(tiny_checkpoint(variant), out=tmp_path, isolated=True, impl=f"llamacpp:{gguf(variant, 'f32')}")
    assert result.passed, _verdict(result)


def test_isolated_mode_writes_into_the_graph(gguf, tiny_checkpoint, tmp_path):
    """Layer 1 handed zeros as its input: its attention_norm is zeros, whatever layer 0 computed."""
    checkpoint = open_checkpoint(tiny_checkpoint("3.0"))
    impl = resolve(f"llamacpp:{gguf('3.0', 'f32')}")
    tokens = torch.tensor(prompt_tokens(checkpoint, DEFAULT_PROMPT))  # [T]
    fed = lambda layer: torch.full((len(tokens), checkpoint.config.dim), 0.0 if layer == 1 else 0.5)  # [T, dim]
    with tracing(tmp_path / "t.h5", dtype="float32"), isolated(fed, checkpoint.config.n_layers, impl.name):
        impl.forward(checkpoint, tokens, dtype=torch.float32, device="cpu")
    with load_trace(tmp_path / "t.h5") as trace:
        assert float(trace["layers.1.attention_norm"].abs().max()) == 0.0
        assert float(trace["layers.0.attention_norm"].abs().max()) > 0.0


def test_generate_runs_through_llama_cpps_kv_cache(gguf, tiny_checkpoint, tmp_path):
    result = verify(tiny_checkpoint("3.0"), out=tmp_path, generate=2, impl=f"llamacpp:{gguf('3.0', 'f32')}")
    assert result.passed, _verdict(result)
    names = [r.name for r in result.comparison.results]
    assert "steps.2.layers.2.attention.heads.7.cache_v" in names and "steps.2.logits" in names


def test_a_gguf_run_in_another_dtype_is_refused_in_one_line(gguf, tiny_checkpoint, tmp_path, monkeypatch):
    """Refused before the reference runs (its minutes on a real model): the reference is never built."""
    import harness.verify

    monkeypatch.setattr(harness.verify, "builtin", lambda *a, **k: pytest.fail("the reference ran before the refusal"))
    with pytest.raises(HarnessError, match=r"an F32 GGUF is judged with --dtype float32 .*pass --dtype float32$"):
        verify(tiny_checkpoint("3.0"), out=tmp_path / "v", dtype="bfloat16", impl=f"llamacpp:{gguf('3.0', 'f32')}")
    assert not (tmp_path / "v").exists()


def test_a_gguf_of_another_checkpoint_is_refused_in_one_line(gguf, tiny_checkpoint, tmp_path):
    with pytest.raises(HarnessError, match=r"the GGUF has n_layers 3, dim 128, .*the checkpoint n_layers"):
        verify(tiny_checkpoint("3.2"), out=tmp_path, impl=f"llamacpp:{gguf('3.0', 'f32')}")


def test_q4_k_m_through_llama_cpps_quantizer(gguf):
    from harness.llamacpp import Model

    model = Model.load(gguf("3.0", "q4_k_m"), threads=1)
    assert model.file_type == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M


def test_the_docs_llama_cpp_commands_pass_from_a_fresh_folder(tmp_path):
    """docs/ports.md's llama.cpp commands as a user types them, in an empty folder beside the converter's sdist."""
    section = DOCS.read_text(encoding="utf-8").split("\n## llama.cpp", 1)[1].split("\n## ", 1)[0]
    block = next(body for body in re.findall(r"^```sh\n(.*?)^```", section, re.M | re.S) if "make-tiny" in body)
    converter = Path(os.environ[CONVERTER_ENV])
    sdist = "llama_cpp_python-0.3.36.tar.gz"
    for line in block.splitlines():
        args = shlex.split(line, comments=True)
        if converter.name != sdist:  # a folder or the script itself: given as it is
            args = [str(converter) if a == sdist else a for a in args]
        elif not (tmp_path / sdist).exists():
            (tmp_path / sdist).symlink_to(converter)
        done = subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"`{line}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        if "verify" in args:
            assert re.search(r"^PASS: (\d+)/\1 names within bound", done.stdout, re.M), done.stdout
