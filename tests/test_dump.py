"""harness/dump.py and dump_map.py: a port's dump (.npz, .safetensors, a folder of .npy) imported as a trace.

Every dump here is built from the from-scratch forward's own trace (tiny 3.0, float32), rewritten into the layouts a
port in another runtime writes (ggml's reversed shapes, Hugging Face's half-split q/k, padded tokens, ...): imported
through a map, it must give that trace back bit for bit. The slow tests judge imported dumps against the reference.
"""

from __future__ import annotations

import json
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from harness import load_trace
from harness.checkpoint import open_checkpoint
from harness.compare import compare_traces
from harness.dump import is_dump_spec, open_dump
from harness.errors import HarnessError
from harness.implementation import decoder, resolve
from harness.run import DEFAULT_PROMPT, make_run, trace, trace_scratch
from tests.helpers import assert_expected
from tests.helpers_bad_input import assert_refused, cli

ROOT = Path(__file__).resolve().parent.parent
PORTS = Path(__file__).resolve().parent / "data" / "ports"
DOCS = ROOT / "docs" / "ports.md"


def _block(language: str, starting: str = "") -> str:
    """The first fenced block of docs/ports.md in `language` whose text starts with `starting`."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", DOCS.read_text(encoding="utf-8"), re.M | re.S)
    return next(body for lang, body in blocks if lang == language and body.startswith(starting))


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint) -> Path:
    return tiny_checkpoint("3.0")


@pytest.fixture(scope="module")
def scratch(ckpt, tmp_path_factory) -> Path:
    """The from-scratch forward's trace on tiny 3.0, float32, the default prompt: what every dump here came from."""
    out = tmp_path_factory.mktemp("scratch") / "scratch.h5"
    trace_scratch(open_checkpoint(ckpt), out)
    return out


def arrays(trace_path: Path) -> dict[str, np.ndarray]:
    with load_trace(trace_path) as t:
        return {name: t[name].numpy() for name in t.names}


def assert_same_trace(got: Path, want: Path, names: list[str] | None = None) -> None:
    """Every name of `want` (or `names`) in `got`, bit for bit; the same checkpoint, tokens, dtype and prompt."""
    with load_trace(got) as a, load_trace(want) as b:
        assert a.names == (names or b.names)
        for name in a.names:
            assert_expected(a[name], b[name], what=name)
        for key in ("checkpoint", "tokens", "dtype", "prompt"):
            assert a.attrs[key] == b.attrs[key], key


def heads(values: dict[str, np.ndarray], layer: int, part: str, n: int = 8, every: int = 1) -> np.ndarray:
    """[n, T, ...]: a per-head name of `layer` stacked over heads 0, every, 2 * every, ..."""
    return np.stack([values[f"layers.{layer}.attention.heads.{h * every}.{part}"] for h in range(n)])


def half_split(x: np.ndarray) -> np.ndarray:
    """[..., hd] in Meta's interleaved pairs -> Hugging Face's half-split order (the inverse of interleave_halves)."""
    return np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def ggml(x: np.ndarray) -> np.ndarray:
    """The same values with the shape listed as ggml's ne[], fastest first: what `reverse_shape` reads back."""
    return np.ascontiguousarray(x).reshape(x.shape[::-1])


def do_import(capsys, dump: Path, ckpt: Path, out: Path, *options: str) -> tuple[int, str, str]:
    return cli(capsys, "import", dump, "--checkpoint", ckpt, "--out", out, *options)


# ---- canonical names: no map --------------------------------------------------------------------------------------


def _save(values: dict[str, np.ndarray], path: Path) -> Path:
    """`values` as an .npz, a .safetensors or a folder of .npy files (by the path's suffix)."""
    if path.suffix == ".npz":
        np.savez(path, **values)
    elif path.suffix == ".safetensors":
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in values.items()}, path)
    else:
        path.mkdir()
        for key, value in values.items():
            np.save(path / f"{key}.npy", value)
    return path


@pytest.mark.parametrize("name", ["dump.npz", "dump.safetensors", "dump"])
def test_a_dump_of_canonical_names_imports_to_the_trace_it_came_from(capsys, ckpt, scratch, tmp_path, name):
    dump = _save({**arrays(scratch), "rope_cache": np.zeros(4, np.float32)}, tmp_path / name)
    code, out, err = do_import(capsys, dump, ckpt, tmp_path / "port.h5")
    assert code == 0, err
    assert out.startswith(f"imported 223 of the model's 223 names from {dump} (float32, 17 tokens: the dump's)"), out
    assert "not imported, neither canonical nor in the map (1): rope_cache" in out
    assert_same_trace(tmp_path / "port.h5", scratch)
    with load_trace(tmp_path / "port.h5") as t:
        assert (t.attrs["implementation"], t.attrs["dump"]) == (f"dump:{dump}", str(dump))


def test_tokens_come_from_the_prompt_or_the_ids_given_when_the_dump_has_none(capsys, ckpt, scratch, tmp_path):
    values = arrays(scratch)
    tokens = values.pop("tokens")
    dump = _save(values, tmp_path / "dump.npz")
    assert_refused(*do_import(capsys, dump, ckpt, tmp_path / "a.h5")[::2], "no 'tokens' in the dump", "--prompt")
    assert do_import(capsys, dump, ckpt, tmp_path / "a.h5", "--prompt", DEFAULT_PROMPT)[0] == 0
    assert_same_trace(tmp_path / "a.h5", scratch)
    code, out, _ = do_import(capsys, dump, ckpt, tmp_path / "b.h5", "--tokens", ",".join(map(str, tokens)))
    assert code == 0 and "17 tokens: given" in out
    assert_same_trace(tmp_path / "b.h5", scratch)
    with_tokens = _save({**values, "tokens": tokens.astype(np.float32)}, tmp_path / "floats.npz")  # a C port's
    code, err = do_import(capsys, with_tokens, ckpt, tmp_path / "c.h5", "--prompt", "another prompt")[::2]
    assert_refused(code, err, "the dump ran other tokens (17) than this run (", "first difference at position 1")


def test_bfloat16_values_need_dtype_bfloat16_and_float32_values_may_say_so(capsys, ckpt, scratch, tmp_path):
    """numpy has no bfloat16: a port writes float32 values and says what it computed in; a .safetensors may hold
    bfloat16 itself, which a float32 run refuses."""
    values = arrays(scratch)
    bf16 = {
        k: torch.from_numpy(v).bfloat16() if v.dtype == np.float32 else torch.from_numpy(v) for k, v in values.items()
    }
    save_file(bf16, tmp_path / "bf16.safetensors")
    code, _, err = do_import(capsys, tmp_path / "bf16.safetensors", ckpt, tmp_path / "a.h5")
    assert_refused(code, err, "'embeddings' holds bfloat16 values, the run's dtype is float32: pass --dtype bfloat16")
    assert not (tmp_path / "a.h5").exists()
    assert do_import(capsys, tmp_path / "bf16.safetensors", ckpt, tmp_path / "a.h5", "--dtype", "bfloat16")[0] == 0
    with load_trace(tmp_path / "a.h5") as t:
        assert (t.attrs["dtype"], t.dtype("norm")) == ("bfloat16", "bfloat16")
        assert_expected(t["norm"], bf16["norm"].float(), what="norm")
    rounded = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in bf16.items()}
    dump = _save(rounded, tmp_path / "f32.npz")
    assert do_import(capsys, dump, ckpt, tmp_path / "b.h5", "--dtype", "bfloat16")[0] == 0
    with load_trace(tmp_path / "b.h5") as t:
        assert (t.attrs["dtype"], t.dtype("norm")) == ("bfloat16", "float32")  # judged at bfloat16's rounding


# ---- a port's own names through a map -----------------------------------------------------------------------------


def llama_cpp_style(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The trace in the layout the map of docs/ports.md reads: every tensor with ggml's reversed shape, q/k as
    [T, heads, hd], scores before the scale over a cache padded to T + 5, llama.cpp-like names for some."""
    out = dict(values)
    renamed = {"inp_embd": "embeddings", "result_output": "logits"}
    for layer in range(3):
        renamed |= {f"attn_norm-{layer}": f"layers.{layer}.attention_norm", f"l_out-{layer}": f"layers.{layer}.output"}
        for part in ("q", "k", "scores"):
            for h in range(8):
                del out[f"layers.{layer}.attention.heads.{h}.{part}"]
        out[f"Qcur-{layer}"] = heads(values, layer, "q").transpose(1, 0, 2)  # [T, H, hd]
        out[f"Kcur-{layer}"] = heads(values, layer, "k", n=2, every=4).transpose(1, 0, 2)  # [T, KV, hd]
        scores = heads(values, layer, "scores") * 4.0  # [H, T, T] times sqrt(head_dim): exact
        out[f"kq-{layer}"] = np.concatenate([scores, np.full((8, 17, 5), 7.0, np.float32)], axis=-1)
    for key, name in renamed.items():
        out[key] = out.pop(name)
    return {key: ggml(value) for key, value in out.items()}


def test_the_map_of_the_docs_reads_a_llama_cpp_style_dump_back_to_the_trace(capsys, ckpt, scratch, tmp_path):
    (tmp_path / "llama_cpp.toml").write_text(_block("toml"), encoding="utf-8")
    dump = _save(llama_cpp_style(arrays(scratch)), tmp_path / "dump.npz")
    code, out, err = do_import(capsys, dump, ckpt, tmp_path / "port.h5", "--map", tmp_path / "llama_cpp.toml")
    assert code == 0 and "not imported" not in out, err
    assert_same_trace(tmp_path / "port.h5", scratch)


def renamed(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The trace in the layouts tests/data/ports/renamed.json reads: transposed, half-split and padded q, half-split
    k per KV head, v one key per head, the heads' outputs flat, the gate stored transposed, up doubled."""
    out = dict(values)
    out["tok_embeddings.out"] = np.ascontiguousarray(out.pop("embeddings").T)  # [dim, T]
    for layer in range(3):
        for part in ("q", "k", "v", "output"):
            for h in range(8):
                out.pop(f"layers.{layer}.attention.heads.{h}.{part}")
        q = half_split(heads(values, layer, "q")).transpose(1, 0, 2).reshape(17, -1)  # [T, H * hd]
        out[f"blk.{layer}.q"] = np.concatenate([q, np.ones((3, q.shape[1]), np.float32)])  # [T + 3, H * hd]
        out[f"blk.{layer}.k"] = half_split(heads(values, layer, "k", n=2, every=4))  # [KV, T, hd]
        for h in range(8):
            out[f"blk.{layer}.head{h}.v"] = values[f"layers.{layer}.attention.heads.{h}.v"]
        out[f"blk.{layer}.attn_out"] = heads(values, layer, "output").transpose(1, 0, 2).reshape(-1)  # [T * H * hd]
        out[f"blk.{layer}.ffn_gate"] = out.pop(f"layers.{layer}.feed_forward.gate").T  # a view: saved Fortran-ordered
        out[f"blk.{layer}.ffn_up"] = out.pop(f"layers.{layer}.feed_forward.up") * 2.0
    return out


def test_a_renamed_transposed_padded_dump_with_a_json_map_imports_to_the_same_trace(capsys, ckpt, scratch, tmp_path):
    dump = _save(renamed(arrays(scratch)), tmp_path / "dump")
    code, out, err = do_import(capsys, dump, ckpt, tmp_path / "port.h5", "--map", PORTS / "renamed.json")
    assert code == 0 and "not imported" not in out, err
    assert_same_trace(tmp_path / "port.h5", scratch)


def test_a_map_s_top_level_transforms_apply_to_every_tensor_and_subfolders_name_keys(capsys, ckpt, scratch, tmp_path):
    dump = tmp_path / "dump"
    for name, value in arrays(scratch).items():  # layers/0/attention/heads/3/q.npy, each [1, ...]
        (dump / Path(*name.split("."))).parent.mkdir(parents=True, exist_ok=True)
        np.save(dump / Path(*name.split(".")).with_suffix(".npy"), value[None])
    (tmp_path / "map.json").write_text(json.dumps({"transforms": ["drop_batch"], "names": {}}))
    assert do_import(capsys, dump, ckpt, tmp_path / "port.h5", "--map", tmp_path / "map.json")[0] == 0
    assert_same_trace(tmp_path / "port.h5", scratch)


# ---- refusals: one line, exit 2, nothing written ------------------------------------------------------------------


def _map(tmp_path: Path, text: str, suffix: str = ".toml") -> Path:
    (tmp_path / f"map{suffix}").write_text(text, encoding="utf-8")
    return tmp_path / f"map{suffix}"


def _dump(tmp_path: Path, scratch: Path, **extra: np.ndarray) -> Path:
    """tokens, embeddings and `extra` (a key None: left out) as an .npz."""
    values = {k: v for k, v in arrays(scratch).items() if k in ("tokens", "embeddings")}
    return _save({k: v for k, v in {**values, **extra}.items() if v is not None}, tmp_path / "dump.npz")


Q = "layers.{layer}.attention.heads.{head}.q"
REFUSALS = {
    "missing dump": (lambda t, s: t / "nope.npz", None, ["nope.npz: dump not found"]),
    "not a dump": (lambda t, s: _map(t, "x", ".txt"), None, ["map.txt: not a dump (expected a .safetensors"]),
    "wrong shape": (
        lambda t, s: _dump(t, s, embeddings=np.zeros((17, 129), np.float32)),
        None,
        ["'embeddings' -> 'embeddings': shape [17, 129], expected [17, 128]"],
    ),
    "wrong shape after the map": (
        lambda t, s: _dump(t, s, Qcur=np.zeros((17, 8, 16), np.float32)),
        '[names]\nQcur = { name = "layers.0.attention.heads.{head}.q", transforms = ["transpose(0, 2)"] }',
        [
            "'Qcur' -> 'layers.0.attention.heads.{head}.q': shape [16, 8, 17] ([17, 8, 16] in the dump, then "
            "transpose(0, 2)), expected [8, 17, 16]"
        ],
    ),
    "a transform that fails": (
        lambda t, s: _dump(t, s, q=np.zeros((17, 7), np.float32)),
        '[names]\nq = { name = "layers.0.attention.heads.{head}.q", transforms = ["split_heads(n_heads)"] }',
        ["'q' of shape [17, 7]: transform 'split_heads(n_heads)' failed ("],
    ),
    "unknown transform": (
        lambda t, s: _dump(t, s),
        '[names]\nq = { name = "layers.0.attention.heads.{head}.q", transforms = ["flip"] }',
        ["map.toml: 'q': unknown transform 'flip'; known: drop_batch, split_heads"],
    ),
    "bad transform argument": (
        lambda t, s: _dump(t, s),
        'transforms = ["split_heads(heads)"]\n[names]',
        ["transform 'split_heads(heads)': split_heads: 'heads': expected n_heads (q) or n_kv_heads (k, v)"],
    ),
    "too many arguments": (
        lambda t, s: _dump(t, s),
        'transforms = ["drop_batch(1)"]\n[names]',
        ["transform 'drop_batch(1)': drop_batch() takes other arguments"],
    ),
    "not TOML": (lambda t, s: _dump(t, s), "[names\n", ["map.toml: not a valid TOML map ("]),
    "unknown map key": (lambda t, s: _dump(t, s), "[nmaes]", ["a map holds a table `names`", "not ['nmaes']"]),
    "not canonical": (
        lambda t, s: _dump(t, s),
        '[names]\n"x-{layer}" = "layers.{layer}.query"',
        ["'layers.{layer}.query' is not"],
    ),
    "unknown slot": (lambda t, s: _dump(t, s), '[names]\n"x-{step}" = "norm"', ["unknown slot {step}"]),
    "slot only on the left": (
        lambda t, s: _dump(t, s),
        '[names]\n"x-{layer}" = "norm"',
        ["each slot once on the left"],
    ),
    "outside the model": (
        lambda t, s: _dump(t, s, **{"out-7": np.zeros((17, 128), np.float32)}),
        '[names]\n"out-{layer}" = "layers.{layer}.output"',
        ["'out-7' maps to 'layers.7.output', not a name of this model (3 layers, 8 heads)"],
    ),
    "two keys, one name": (
        lambda t, s: _dump(t, s, x=np.zeros((17, 128), np.float32)),
        '[names]\nx = "embeddings"',
        ["'embeddings' and 'x' both give 'embeddings'"],
    ),
    "nothing to import": (lambda t, s: _dump(t, s, embeddings=None), None, ["no key is a canonical name"]),
    "integers": (lambda t, s: _dump(t, s, norm=np.zeros((17, 128), np.int32)), None, ["'norm' holds integers"]),
    "raw bfloat16": (lambda t, s: _dump(t, s, norm=np.zeros((17, 128), "V2")), None, ["numpy cannot name"]),
    "token ids": (lambda t, s: _dump(t, s, tokens=np.array([1, 9999])), None, ["token id 9999 is outside"]),
}


@pytest.mark.parametrize("refusal", REFUSALS)
def test_a_bad_dump_or_map_is_refused_in_one_line_naming_what(capsys, ckpt, scratch, tmp_path, refusal):
    make, map_text, fragments = REFUSALS[refusal]
    dump = make(tmp_path, scratch)
    options = ["--map", _map(tmp_path, map_text)] if map_text is not None else []
    code, _, err = do_import(capsys, dump, ckpt, tmp_path / "port.h5", *options)
    assert_refused(code, err, *fragments)
    assert not (tmp_path / "port.h5").exists()


def test_a_missing_map_or_bad_token_ids_are_refused(capsys, ckpt, scratch, tmp_path):
    dump = _dump(tmp_path, scratch)
    assert_refused(*do_import(capsys, dump, ckpt, tmp_path / "a.h5", "--map", tmp_path / "m.toml")[::2], "not found")
    code, _, err = do_import(capsys, dump, ckpt, tmp_path / "a.h5", "--tokens", "1,x")
    assert_refused(code, err, "argument --tokens: expected token ids separated by commas")


# ---- a dump as an implementation: --impl dump:PATH ----------------------------------------------------------------


def test_a_dump_is_an_implementation_that_records_its_tensors_and_returns_its_logits(ckpt, scratch, tmp_path):
    dump = _save(arrays(scratch), tmp_path / "dump.npz")
    impl = resolve(f"dump:{dump}")
    assert impl.name == f"dump:{dump}" and impl.metadata == {"dump": str(dump)}
    run = make_run(ckpt)
    logits = trace(run, impl, tmp_path / "port.h5")
    assert_expected(logits, torch.from_numpy(arrays(scratch)["logits"]), what="logits")
    assert_same_trace(tmp_path / "port.h5", scratch)
    with pytest.raises(HarnessError, match="--generate needs forward"):
        decoder(impl)
    no_logits = _save({k: v for k, v in arrays(scratch).items() if k != "logits"}, tmp_path / "no_logits.npz")
    with pytest.raises(HarnessError, match="no logits in the dump: verify needs the port's logits"):
        trace(run, resolve(f"dump:{no_logits}"), tmp_path / "x.h5")
    with pytest.raises(HarnessError, match="the dump ran other tokens"):
        trace(make_run(ckpt, prompt="hi"), impl, tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()


def test_dump_colon_names_a_dump_unless_it_is_a_module_attribute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert is_dump_spec("dump:out.npz") and is_dump_spec("dump:a/b?map=m.toml") and is_dump_spec("dump:out")
    assert not is_dump_spec("dump:forward")  # a module `dump` and its attribute, as before
    with pytest.raises(HarnessError, match="no module named 'dump'"):
        resolve("dump:forward")
    with pytest.raises(HarnessError, match="nope.npz: dump not found"):
        resolve("dump:nope.npz")


# ---- slow: judged against the reference ----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_docs_walk_through_passes_compare_from_a_fresh_folder(tmp_path):
    lines = _block("sh", "python -m harness make-tiny").strip().splitlines()
    for line in lines:
        args = shlex.split(line)
        done = subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"`{line}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert "PASS: 222/222 names within bound" in done.stdout, done.stdout
    shown = re.search(r"`import` prints `([^`]*)`", DOCS.read_text(encoding="utf-8"))[1]
    imported = subprocess.run(
        [sys.executable, *shlex.split(lines[-2])[1:], "--out", "again.h5"], cwd=tmp_path, capture_output=True, text=True
    )
    assert imported.stdout.strip() == shown.replace("port.h5", "again.h5"), imported.stdout


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_imported_dump_passes_against_the_reference_and_a_wrong_map_fails_at_q(capsys, traced_pair, tmp_path, dtype):
    reference, scratch = traced_pair("3.0", dtype)
    ckpt = load_trace(reference).attrs["checkpoint_path"]
    dump = _save(renamed(arrays(scratch)), tmp_path / "dump.npz")  # float32 values; bfloat16 ones are exact in it
    assert (
        do_import(capsys, dump, ckpt, tmp_path / "port.h5", "--map", PORTS / "renamed.json", "--dtype", dtype)[0] == 0
    )
    assert compare_traces(reference, tmp_path / "port.h5").passed
    wrong = json.loads((PORTS / "renamed.json").read_text())
    wrong["names"]["blk.{layer}.q"]["transforms"].remove("interleave_halves")  # q left in the half-split order
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    assert (
        do_import(capsys, dump, ckpt, tmp_path / "wrong.h5", "--map", tmp_path / "wrong.json", "--dtype", dtype)[0] == 0
    )
    assert compare_traces(reference, tmp_path / "wrong.h5").first_divergence == "layers.0.attention.heads.0.q"


@pytest.mark.slow
def test_a_numpy_port_passes_through_its_map_and_a_rope_bug_in_it_fails_at_q_rotated(capsys, traced_pair, tmp_path):
    """tests/data/ports/numpy_llama.py: a forward in NumPy with Hugging Face's q/k layout and names of its own, not
    this repository's torch code; its bug is the README's (rope_theta hard-coded to Llama 2's 10000)."""
    reference, _ = traced_pair("3.0")
    ckpt = load_trace(reference).attrs["checkpoint_path"]
    source = (PORTS / "numpy_llama.py").read_text(encoding="utf-8")
    assert source.count("c.rope_theta ** -") == 1
    first = {}
    for port, text in {"port": source, "bug": source.replace("c.rope_theta ** -", "10000.0 ** -")}.items():
        (tmp_path / f"{port}.py").write_text(text, encoding="utf-8")
        dump: dict[str, np.ndarray] = {}
        runpy.run_path(str(tmp_path / f"{port}.py"))["forward"](ckpt, dump)
        np.savez(tmp_path / f"{port}.npz", **dump)
        out = tmp_path / f"{port}.h5"
        assert do_import(capsys, tmp_path / f"{port}.npz", ckpt, out, "--map", PORTS / "numpy_llama.toml")[0] == 0
        first[port] = compare_traces(reference, out).first_divergence
    assert first == {"port": None, "bug": "layers.0.attention.heads.0.q_rotated"}


@pytest.mark.slow
def test_verify_judges_a_dump_as_an_implementation(capsys, ckpt, scratch, tmp_path):
    dump = _save(renamed(arrays(scratch)), tmp_path / "dump.npz")
    code, out, err = cli(
        capsys, "verify", ckpt, "--impl", f"dump:{dump}?map={PORTS / 'renamed.json'}", "--out", tmp_path / "v"
    )
    assert code == 0, err
    assert "PASS: 222/222 names within bound" in out and (tmp_path / "v" / "report.html").is_file()
    assert_refused(*cli(capsys, "verify", ckpt, "--impl", f"dump:{dump}", "--isolated", "--out", tmp_path / "w")[::2])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_the_c_example_of_the_docs_compiles_and_writes_a_dump_numpy_reads(tmp_path):
    (tmp_path / "dump.c").write_text(_block("c"), encoding="utf-8")
    build = subprocess.run(
        ["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "dump.c", "-o", "dump"], cwd=tmp_path, capture_output=True
    )
    assert build.returncode == 0, build.stderr.decode()
    (tmp_path / "out").mkdir()
    assert subprocess.run(["./dump", "out"], cwd=tmp_path).returncode == 0
    with open_dump(tmp_path / "out") as dump:
        assert sorted(dump.keys) == ["embeddings", "tokens"]
        assert_expected(dump.read("tokens"), torch.tensor([128000.0, 1820.0, 4320.0]), what="tokens")
        want = torch.arange(3.0)[:, None] + torch.arange(4.0) / 4  # [3, 4]: x[t][i] = t + i / 4
        assert_expected(dump.read("embeddings"), want, what="embeddings")
