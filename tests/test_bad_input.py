"""Bad input, faults and untrusted checkpoints: each command answers with exit 2 and one line naming the file.

Every test spoils one thing in a copy of the tiny checkpoint, runs the command, and checks: exit code 2, one line on
stderr naming the file/key/tensor (and both sides of a mismatch), no traceback, and no file created or changed.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import harness
from harness import names
from harness.checkpoint import open_checkpoint
from harness.cli import main
from harness.errors import HarnessError
from harness.tokenizer import BOS, encode_prompt, load_tokenizer
from tests.helpers import compute_once
from tests.helpers_bad_input import (
    REPO,
    assert_refused,
    cli,
    copy_checkpoint,
    edit_json,
    rewrite_shard,
    run_cli,
    snapshot,
    truncate,
    write_hf_checkpoint,
    write_shards,
)


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    """A private copy of the tiny Llama-3.0 Meta checkpoint, free to spoil."""
    return copy_checkpoint(tiny_checkpoint("3.0"), tmp_path / "ckpt")


@pytest.fixture
def hf_ckpt(tiny_checkpoint, tmp_path):
    return write_hf_checkpoint(tiny_checkpoint("3.0"), tmp_path / "hf")


@pytest.fixture
def out(tmp_path):
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


def refused_trace(capsys, tmp_path, checkpoint, *fragments, extra=()) -> str:
    """`trace CHECKPOINT --out out/t.h5` refused, naming `fragments`, with nothing under tmp_path created or changed."""
    (tmp_path / "out").mkdir(exist_ok=True)
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "trace", checkpoint, "--out", tmp_path / "out" / "t.h5", *extra)
    assert_refused(code, err, *fragments)
    assert snapshot(tmp_path) == before, "a failed run must not create or change a file"
    return err


# -- the checkpoint directory and its config ----------------------------------------------------------------------


def test_missing_checkpoint_directory(capsys, tmp_path):
    refused_trace(capsys, tmp_path, tmp_path / "nope", f"{tmp_path / 'nope'}: checkpoint directory not found")


def test_no_params_json_and_no_config_json(capsys, tmp_path, ckpt):
    (ckpt / "params.json").unlink()
    refused_trace(capsys, tmp_path, ckpt, str(ckpt), "neither params.json", "nor config.json")


@pytest.mark.parametrize("fmt, config_file", [("meta", "params.json"), ("hf", "config.json")])
def test_unparsable_config(capsys, tmp_path, ckpt, hf_ckpt, fmt, config_file):
    folder = ckpt if fmt == "meta" else hf_ckpt
    (folder / config_file).write_text('{"dim": 128,')
    refused_trace(capsys, tmp_path, folder, f"{folder / config_file}: not valid JSON")


@pytest.mark.parametrize(
    "fmt, config_file, key",
    [("meta", "params.json", "dim"), ("meta", "params.json", "n_layers"), ("hf", "config.json", "num_hidden_layers")],
)
def test_config_missing_a_required_key(capsys, tmp_path, ckpt, hf_ckpt, fmt, config_file, key):
    folder = ckpt if fmt == "meta" else hf_ckpt
    edit_json(folder / config_file, drop=(key,))
    refused_trace(capsys, tmp_path, folder, f"{folder / config_file}: required key {key!r} is missing")


@pytest.mark.parametrize("key, value", [("rope_theta", "big"), ("max_seq_len", "long"), ("n_kv_heads", 2.5)])
def test_config_value_of_the_wrong_type(capsys, tmp_path, ckpt, key, value):
    edit_json(ckpt / "params.json", **{key: value})
    refused_trace(capsys, tmp_path, ckpt, f"{ckpt / 'params.json'}: key {key!r} has the wrong type")


def test_config_inconsistent_with_itself_names_the_file(capsys, tmp_path, ckpt):
    edit_json(ckpt / "params.json", n_kv_heads=3)  # 8 query heads cannot share 3 KV heads
    refused_trace(capsys, tmp_path, ckpt, f"{ckpt / 'params.json'}: n_heads (8) must be divisible by n_kv_heads (3)")


@pytest.mark.parametrize(
    "change, tensor, got, want",
    [
        (dict(n_kv_heads=4), "layers.0.attention.wk.weight", [32, 128], [64, 128]),
        (dict(ffn_dim_multiplier=1.0), "layers.0.feed_forward.w1.weight", [448, 128], [352, 128]),
        (dict(vocab_size=1000), "tok_embeddings.weight", [768, 128], [1000, 128]),
    ],
)
def test_config_and_tensor_shapes_disagree(capsys, tmp_path, ckpt, change, tensor, got, want):
    edit_json(ckpt / "params.json", **change)
    refused_trace(capsys, tmp_path, ckpt, f"tensor {tensor} has shape {got}, config implies {want}")


def test_hf_config_and_tensor_shapes_disagree(capsys, tmp_path, hf_ckpt):
    edit_json(hf_ckpt / "config.json", intermediate_size=64)
    refused_trace(
        capsys, tmp_path, hf_ckpt, "layers.0.feed_forward.w1.weight has shape [448, 128], config implies [64, 128]"
    )


# -- tensor files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0])
def test_truncated_meta_shard(capsys, tmp_path, ckpt, keep):
    truncate(ckpt / "consolidated.00.pth", keep)
    refused_trace(capsys, tmp_path, ckpt, f"{ckpt / 'consolidated.00.pth'}: cannot read checkpoint shard: truncated")


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_truncated_safetensors(capsys, tmp_path, hf_ckpt, keep):
    truncate(hf_ckpt / "model.safetensors", keep)
    refused_trace(
        capsys, tmp_path, hf_ckpt, f"{hf_ckpt / 'model.safetensors'}: cannot read safetensors file (truncated"
    )


def test_hf_checkpoint_written_by_the_helper_is_readable(tiny_checkpoint, hf_ckpt):
    """The helper's HF directory is a faithful one, so the refusals above are about the spoiling alone."""
    assert open_checkpoint(hf_ckpt).fingerprint() == open_checkpoint(tiny_checkpoint("3.0")).fingerprint()


def test_shard_that_is_not_a_dict_of_tensors(capsys, tmp_path, ckpt):
    sd = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    sd["norm.weight"] = [1.0, 2.0]  # a list where a tensor belongs
    torch.save(sd, ckpt / "consolidated.00.pth")
    refused_trace(
        capsys, tmp_path, ckpt, f"{ckpt / 'consolidated.00.pth'}: expected a dict of tensors", "'norm.weight'"
    )


def _wq_rows(shard, rows):
    return shard["layers.0.attention.wq.weight"][:rows].clone()


@pytest.mark.parametrize(
    "spoil, fragments",
    [
        # the second shard's wq has one column too few: the non-split dim disagrees
        (
            lambda s: dict(layers__0__attention__wq__weight=s["layers.0.attention.wq.weight"][:, :-1].clone()),
            ["shards do not fit together", "layers.0.attention.wq.weight has shapes [[64, 128], [64, 127]]"],
        ),
        # a replicated norm with a different shape
        (
            lambda s: dict(norm__weight=s["norm.weight"][:-1].clone()),
            ["shards do not fit together", "norm.weight has shapes [[128], [127]]"],
        ),
        # a replicated norm with different values: a shard of another checkpoint
        (
            lambda s: dict(layers__1__ffn_norm__weight=s["layers.1.ffn_norm.weight"] + 1),
            ["shards do not fit together", "replicated tensor layers.1.ffn_norm.weight differs"],
        ),
        # a tensor missing from the second shard
        (
            lambda s: dict(layers__2__feed_forward__w2__weight=None),
            ["consolidated.01.pth: shards do not fit together: tensor names differ", "layers.2.feed_forward.w2.weight"],
        ),
        # the halves merge to the wrong size along the split dim
        (
            lambda s: dict(layers__0__attention__wq__weight=_wq_rows(s, 32)),
            ["tensor layers.0.attention.wq.weight has shape [96, 128], config implies [128, 128]"],
        ),
    ],
    ids=["other-dim", "replicated-shape", "replicated-values", "missing-tensor", "split-dim-sum"],
)
def test_meta_shards_that_do_not_fit_together(capsys, tmp_path, tiny_checkpoint, spoil, fragments):
    sharded = write_shards(tiny_checkpoint("3.0"), tmp_path / "sharded", 2)
    second = sharded / "consolidated.01.pth"
    rewrite_shard(second, **spoil(torch.load(second, weights_only=True)))
    refused_trace(capsys, tmp_path, sharded, str(sharded), *fragments)


class _RunsCode:
    """Pickles as a call to os.system: unpickling it with plain pickle would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle-protocol-2", "pickle-protocol-4"])
def test_pickle_that_tries_to_run_code_is_refused(capsys, tmp_path, ckpt, writer):
    marker = tmp_path / "MARKER"
    payload = {"tok_embeddings.weight": _RunsCode(marker)}
    shard = ckpt / "consolidated.00.pth"
    if writer == "torch.save":
        torch.save(payload, shard)
    else:
        shard.write_bytes(pickle.dumps(payload, protocol=int(writer[-1])))
    err = refused_trace(capsys, tmp_path, ckpt, f"{shard}: refused to load", "nothing from it was run")
    assert not marker.exists(), "the pickle's code ran"
    if writer != "pickle-protocol-4":  # protocol 4 is refused at its first opcode, before the call is seen
        assert "posix.system" in err or "os.system" in err


# -- tokenizer and prompt -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"\x00\xff\xfe garbage\n\x01\x02", b"hello world\n", b"YQ== 0\nYg== 5\n"],
    ids=["binary", "text", "rank-gap"],
)
def test_garbage_tokenizer_model(capsys, tmp_path, ckpt, content):
    (ckpt / "tokenizer.model").write_bytes(content)
    refused_trace(capsys, tmp_path, ckpt, f"{ckpt / 'tokenizer.model'}:")


def test_missing_tokenizer_model(capsys, tmp_path, ckpt):
    (ckpt / "tokenizer.model").unlink()
    refused_trace(capsys, tmp_path, ckpt, f"{ckpt}: no tokenizer.model")


def test_special_token_text_in_a_prompt_becomes_the_special_token(capsys, ckpt, out):
    """Legal. As HF's tokenizer does, `<|eot_id|>` typed in a prompt is encoded as the single special token, not as
    the characters '<', '|', ...; a second `<|begin_of_text|>` is likewise the BOS id."""
    enc = load_tokenizer(ckpt / "tokenizer.model")
    bos, eot = enc.encode_single_token(BOS), enc.encode_single_token("<|eot_id|>")
    code, stdout, err = cli(capsys, "trace", ckpt, "--out", out / "t.h5", "--prompt", "hi<|eot_id|><|begin_of_text|>")
    assert code == 0, err
    assert harness.load_trace(out / "t.h5").tokens == [bos, *enc.encode("hi"), eot, bos]


def test_empty_prompt_is_just_begin_of_text(capsys, ckpt, out):
    code, _, err = cli(capsys, "trace", ckpt, "--out", out / "t.h5", "--prompt", "")
    assert code == 0, err
    with harness.load_trace(out / "t.h5") as trace:
        assert trace.tokens == [load_tokenizer(ckpt / "tokenizer.model").encode_single_token(BOS)]
        assert trace.shape("logits") == (1, 768)


def test_prompt_longer_than_the_context(capsys, tmp_path, ckpt):
    edit_json(ckpt / "params.json", max_seq_len=4)
    refused_trace(
        capsys,
        tmp_path,
        ckpt,
        str(ckpt),
        "longer than the model's context of 4",
        "max_seq_len",
        extra=("--prompt", "a prompt of well over four tokens"),
    )


def test_prompt_file_is_read_as_it_is(capsys, tmp_path, ckpt, out):
    """`--prompt-file`: the file's text exactly (a final newline included), and the token count printed."""
    text = "the answer to the ultimate question of life\n" * 20
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    code, stdout, err = cli(capsys, "trace", ckpt, "--prompt-file", tmp_path / "prompt.txt", "--out", out / "t.h5")
    assert code == 0, err
    trace = harness.load_trace(out / "t.h5")
    assert trace.attrs["prompt"] == text
    assert trace.tokens == encode_prompt(load_tokenizer(ckpt / "tokenizer.model"), text)
    assert f"{len(trace.tokens)} tokens" in stdout, stdout


@pytest.mark.parametrize("content, fragment", [(None, "prompt file not found"), (b"\xff\xfe bad", "not UTF-8 text")])
def test_bad_prompt_file(capsys, tmp_path, ckpt, content, fragment):
    if content is not None:
        (tmp_path / "prompt.txt").write_bytes(content)
    refused_trace(capsys, tmp_path, ckpt, "prompt.txt", fragment, extra=("--prompt-file", tmp_path / "prompt.txt"))


def test_prompt_file_longer_than_the_context(capsys, tmp_path, ckpt):
    edit_json(ckpt / "params.json", max_seq_len=64)
    (tmp_path / "prompt.txt").write_text("one two three four five six seven eight nine ten " * 20)
    refused_trace(
        capsys,
        tmp_path,
        ckpt,
        "longer than the model's context of 64",
        "max_seq_len",
        extra=("--prompt-file", tmp_path / "prompt.txt"),
    )


def test_unknown_device(capsys, tmp_path, ckpt):
    refused_trace(capsys, tmp_path, ckpt, "unknown device 'gpu0'", extra=("--device", "gpu0"))


# -- the output -----------------------------------------------------------------------------------------------------


def test_output_folder_does_not_exist(capsys, tmp_path, ckpt):
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "trace", ckpt, "--out", tmp_path / "nope" / "t.h5")
    assert_refused(code, err, f"output folder {tmp_path / 'nope'} does not exist")
    assert snapshot(tmp_path) == before


def test_output_is_an_existing_folder(capsys, tmp_path, ckpt, out):
    """Unwritable output, kind 1: tests run as root, where chmod does not stop writes; a folder can't become a file."""
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "trace", ckpt, "--out", out)
    assert_refused(code, err, f"{out}: is a folder")
    assert snapshot(tmp_path) == before


def test_output_under_a_regular_file(capsys, tmp_path, ckpt):
    """Unwritable output, kind 2: the output's folder is a file."""
    (tmp_path / "plain.txt").write_text("not a folder")
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "trace", ckpt, "--out", tmp_path / "plain.txt" / "t.h5")
    assert_refused(code, err, f"{tmp_path / 'plain.txt'} is a file, not a folder")
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(not os.path.isdir("/sys"), reason="needs /sys, a folder even root cannot create files in")
def test_output_in_a_folder_the_system_refuses(capsys, tmp_path, ckpt):
    """Unwritable output, kind 3: /sys refuses new files even to root (EACCES), unlike a chmod-ed folder."""
    try:
        open("/sys/.harness-probe", "w").close()
    except OSError:
        pass
    else:
        os.unlink("/sys/.harness-probe")
        pytest.skip("/sys accepts new files here")
    code, _, err = cli(capsys, "trace", ckpt, "--out", "/sys/t.h5")
    assert_refused(code, err, "/sys/t.h5: cannot write in /sys")
    assert not os.path.exists("/sys/t.h5")


def test_existing_trace_is_left_byte_identical_when_a_run_is_refused(capsys, tmp_path, ckpt, out):
    assert cli(capsys, "trace", ckpt, "--out", out / "t.h5")[0] == 0
    edit_json(ckpt / "params.json", max_seq_len=2)
    refused_trace(capsys, tmp_path, ckpt, "longer than the model's context")


def test_existing_trace_is_left_byte_identical_when_a_run_fails_mid_trace(capsys, tmp_path, ckpt, out, monkeypatch):
    """A failure after the temporary file is open (here: in layer 1's feed-forward) leaves no trace of itself."""
    from harness import scratch

    assert cli(capsys, "trace", ckpt, "--out", out / "t.h5")[0] == 0
    original = scratch.feed_forward

    def fails_in_layer_1(layer, *args):
        assert any(p.name.endswith(".tmp") for p in out.iterdir()), "the temporary should be open by now"
        if layer == 1:
            raise HarnessError("layer 1: simulated fault")
        return original(layer, *args)

    monkeypatch.setattr(scratch, "feed_forward", fails_in_layer_1)
    refused_trace(capsys, tmp_path, ckpt, "simulated fault")


def test_make_tiny_into_a_non_empty_directory(capsys, tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "make-tiny", tmp_path / "dir")
    assert_refused(code, err, f"{tmp_path / 'dir'}: output directory is not empty")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["file", "missing-parent"])
def test_make_tiny_into_a_path_that_cannot_be_a_new_directory(capsys, tmp_path, kind):
    (tmp_path / "file").write_text("mine")
    target = tmp_path / "file" if kind == "file" else tmp_path / "a" / "b"
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "make-tiny", target)
    assert_refused(code, err, str(target))
    assert snapshot(tmp_path) == before


# -- reading traces ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def traced_once(tiny_checkpoint, tmp_path_factory, worker_id) -> Path:
    def compute(folder: Path) -> str:
        path = folder / "good.h5"
        assert main(["trace", str(tiny_checkpoint("3.0")), "--out", str(path), "--names", "layers.0.*"]) == 0
        return str(path)

    return Path(compute_once(tmp_path_factory, worker_id, "bad-input-good-trace", compute))


@pytest.fixture
def good_trace(traced_once, tmp_path) -> Path:
    """A private copy of a trace `trace` wrote (layer 0 of tiny 3.0), free to spoil."""
    return Path(shutil.copy(traced_once, tmp_path / "good.h5"))


@pytest.mark.parametrize("content", ["half", "head", "empty", "text"])
def test_load_trace_of_a_truncated_or_non_hdf5_file(good_trace, tmp_path, content):
    data = good_trace.read_bytes()
    bad = tmp_path / "bad.h5"
    bad.write_bytes(
        {"half": data[: len(data) // 2], "head": data[:100], "empty": b"", "text": b"not hdf5\n" * 50}[content]
    )
    with pytest.raises(HarnessError, match=f"{bad}: not a readable HDF5 trace"):
        harness.load_trace(bad)


@pytest.mark.parametrize("version, shown", [(3, "3"), ("one", "'one'")])
def test_load_trace_of_another_format_version(good_trace, version, shown):
    with h5py.File(good_trace, "a") as f:
        f.attrs["format_version"] = version
    with pytest.raises(
        HarnessError, match=f"{good_trace}: trace format version {shown}, this harness reads versions 1 and 2"
    ):
        harness.load_trace(good_trace)


def test_load_trace_of_an_hdf5_file_that_is_not_a_trace(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1, 2, 3]
    with pytest.raises(HarnessError, match=f"{tmp_path / 'other.h5'}: not a harness trace"):
        harness.load_trace(tmp_path / "other.h5")


# -- the real process: exit codes, one line, --debug ------------------------------------------------------------------


@pytest.mark.slow  # `python -m harness` in its own process: seconds of imports each
@pytest.mark.parametrize("kind", ["missing-dir", "truncated-shard", "refused-pickle", "garbage-tokenizer"])
def test_subprocess_answers_with_one_line_and_exit_2(tmp_path, ckpt, kind):
    """The same refusals from `python -m harness` in its own process: no traceback, no stray warnings."""
    if kind == "truncated-shard":
        truncate(ckpt / "consolidated.00.pth")
    elif kind == "refused-pickle":
        (ckpt / "consolidated.00.pth").write_bytes(pickle.dumps({"x": _RunsCode(tmp_path / "MARKER")}, protocol=2))
    elif kind == "garbage-tokenizer":
        (ckpt / "tokenizer.model").write_bytes(b"\x00garbage")
    target = tmp_path / "nope" if kind == "missing-dir" else ckpt
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path)
    result = run_cli("trace", target, "--out", tmp_path / "out" / "t.h5")
    assert_refused(result.returncode, result.stderr, str(target))
    assert result.stderr.startswith("error: ")
    assert snapshot(tmp_path) == before and not (tmp_path / "MARKER").exists()


@pytest.mark.slow  # `python -m harness` in its own process: seconds of imports each
def test_debug_flag_keeps_the_traceback(tmp_path):
    result = run_cli("--debug", "trace", tmp_path / "nope", "--out", tmp_path / "t.h5")
    assert result.returncode != 0 and "Traceback" in result.stderr and "HarnessError" in result.stderr


# -- interrupts and determinism ---------------------------------------------------------------------------------------

# Big enough that the forward takes seconds (8 layers, dim 512, ~300 tokens), small enough to make in a second.
_BIG = dict(
    dim=512,
    n_layers=8,
    n_heads=8,
    n_kv_heads=2,
    multiple_of=256,
    ffn_dim_multiplier=1.0,
    norm_eps=1e-5,
    rope_theta=500000.0,
)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    from harness.tiny import make_tiny_meta

    path = tmp_path_factory.mktemp("big") / "ckpt"
    make_tiny_meta(path, params=_BIG)
    return path


def _reset_sigint():
    # a child inherits an ignored SIGINT (as some runners set it); reset so Python installs KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow  # `python -m harness` in its own process: seconds of imports each
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_mid_trace_leaves_the_previous_output_and_no_temporary(
    capsys, tiny_checkpoint, big_checkpoint, out, sig
):
    path = out / "t.h5"
    assert cli(capsys, "trace", tiny_checkpoint("3.0"), "--out", path)[0] == 0
    previous = path.read_bytes()
    cmd = [
        sys.executable,
        "-m",
        "harness",
        "trace",
        str(big_checkpoint),
        "--out",
        str(path),
        "--names",
        "logits",
        "--prompt",
        "hello world, " * 100,
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_reset_sigint
    )
    try:
        tmp = out / f".t.h5.{proc.pid}.tmp"
        deadline = time.monotonic() + 120
        while not tmp.exists():
            assert proc.poll() is None, f"trace ended before its temporary appeared: {proc.communicate()}"
            assert time.monotonic() < deadline, "the temporary never appeared"
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, f"exit {proc.returncode}: {err}"
    assert "Traceback" not in err and "interrupted" in err
    assert path.read_bytes() == previous, "the previous output must be byte-identical"
    assert sorted(p.name for p in out.iterdir()) == ["t.h5"], "no temporary may be left behind"


def _datasets(path) -> dict[str, tuple]:
    """Every dataset's bytes, dtype, shape and attributes, and the file's attributes."""
    found = {}
    with h5py.File(path, "r") as f:
        found["/"] = dict(f.attrs)
        f.visititems(
            lambda name, obj: (
                found.__setitem__(name, (obj.dtype.str, obj.shape, obj[()].tobytes(), dict(obj.attrs)))
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    return found


@pytest.mark.slow  # `python -m harness` in its own process: seconds of imports each
def test_two_trace_runs_are_bit_identical(tiny_checkpoint, tmp_path):
    """Two separate processes, same checkpoint and prompt: every dataset identical to the bit, attributes too."""
    for name in ("a.h5", "b.h5"):
        result = run_cli("trace", tiny_checkpoint("3.0"), "--out", tmp_path / name, "--dtype", "bfloat16")
        assert result.returncode == 0, result.stderr
    a, b = _datasets(tmp_path / "a.h5"), _datasets(tmp_path / "b.h5")
    c = open_checkpoint(tiny_checkpoint("3.0")).config
    assert a.keys() == b.keys() and len(a) == 1 + len(list(names.canonical_names(c.n_layers, c.n_heads)))  # and "/"
    for key in a:
        if key == "/":
            assert {k: v for k, v in a[key].items()} == b[key]
            continue
        assert a[key][:2] == b[key][:2] and a[key][2] == b[key][2], f"{key} differs between runs"
        assert {k: np.asarray(v).tolist() for k, v in a[key][3].items()} == {
            k: np.asarray(v).tolist() for k, v in b[key][3].items()
        }
