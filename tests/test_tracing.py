"""The recording API (harness/recording.py: the open trace in a context variable, generation steps) and the HDF5 layout
(harness/trace_file.py): names to paths, dtypes, metadata, filters, atomic writes."""

import contextvars
import importlib.util

import h5py
import pytest
import torch

import harness
from harness import Rows, Trace, is_tracing, layer_input, load_trace, record, step, tracing
from harness.errors import HarnessError
from harness.names import FULL_SQUARE_MAX_T, SAMPLED_ROWS
from harness.recording import record_calls, recorded
from harness.trace_file import COMPRESS_MIN_BYTES


def test_record_outside_tracing_is_a_no_op(tmp_path):
    harness.record("embeddings", torch.ones(2))  # nothing open: nothing happens
    assert not harness.is_tracing() and list(tmp_path.iterdir()) == []


def test_the_public_names_and_tracing_is_only_the_function():
    """`harness.tracing` is the context manager, no module shadowed by it (the format is harness.trace_file)."""
    assert (tracing, record, step, is_tracing, layer_input) == (
        harness.tracing,
        harness.record,
        harness.step,
        harness.is_tracing,
        harness.layer_input,
    )
    assert (Rows, Trace, load_trace) == (harness.Rows, harness.Trace, harness.load_trace)
    assert callable(harness.tracing) and importlib.util.find_spec("harness.tracing") is None


def test_the_open_trace_is_scoped_to_its_context(tmp_path):
    """The recorder lives in a context variable: a fresh context (a thread's, unless it copies the context) sees no
    open trace, and records made there are no-ops; the block's own context sees it until the block ends."""
    with tracing(tmp_path / "t.h5"):
        assert is_tracing() and not contextvars.Context().run(is_tracing)
        contextvars.Context().run(record, "embeddings", torch.ones(1, 2))
        record("norm", torch.ones(1))
        assert record_calls() == 1
    assert not is_tracing() and load_trace(tmp_path / "t.h5").names == ["norm"]


def test_step_puts_names_and_extras_in_the_step(tmp_path):
    """`with harness.step(s):` records NAME as steps.{s}.NAME and an extra `_oracle.NAME` as `_oracle.steps.{s}.NAME`;
    `recorded` asks in the step; names outside any step stay as they are."""
    with tracing(tmp_path / "t.h5"):
        record("tokens", torch.tensor([1, 2]))
        with step(2):
            record("layers.0.attention.heads.1.q", torch.ones(1, 4))
            record("_oracle.layers.0.attention.heads.1.q", torch.ones(1, 4).double())
            assert recorded("layers.0.attention.heads.1.q") and not recorded("logits")
        assert recorded("steps.2.layers.0.attention.heads.1.q") and not recorded("layers.0.attention.heads.1.q")
        with step(0):
            record("logits", torch.zeros(2, 3))
    trace = load_trace(tmp_path / "t.h5")
    assert trace.names == ["tokens", "steps.0.logits", "steps.2.layers.0.attention.heads.1.q"]
    assert trace.extra_names == ["_oracle.steps.2.layers.0.attention.heads.1.q"]


def test_steps_do_not_nest_and_end_with_their_block(tmp_path):
    with tracing(tmp_path / "t.h5"):
        with step(1):
            with pytest.raises(HarnessError, match=r"harness.step\(2\) inside harness.step\(1\)"):
                with step(2):
                    pass
        with pytest.raises(RuntimeError, match="boom"):
            with step(3):
                raise RuntimeError("boom")
        record("norm", torch.ones(1))  # no step left open by the failed block
    assert load_trace(tmp_path / "t.h5").names == ["norm"]


def test_step_outside_a_trace_does_nothing_and_a_bad_step_is_refused():
    with step(1):
        record("norm", torch.ones(1))
        assert not is_tracing()
    for bad in (-1, "1", 1.0):
        with pytest.raises(HarnessError, match="expected a generation step"):
            with step(bad):
                pass


def test_record_calls_count_filtered_names_too(tmp_path):
    with tracing(tmp_path / "t.h5", names=["norm"]):
        record("embeddings", torch.ones(1, 2))
        record("norm", torch.ones(1, 2))
        assert record_calls() == 2
    assert record_calls() == 0 and load_trace(tmp_path / "t.h5").names == ["norm"]


def test_layout_dtype_and_metadata(tmp_path):
    path = tmp_path / "t.h5"
    q = torch.randn(5, 16, dtype=torch.bfloat16)
    with harness.tracing(path, implementation="mine", dtype="bfloat16", tokens=[1, 2, 3]):
        harness.record("tokens", torch.tensor([1, 2, 3]))
        harness.record("layers.0.attention.heads.3.q_rotated", q)
    with h5py.File(path) as f:
        ds = f["/layers/0/attention/heads/3/q_rotated"]
        assert ds.dtype == "float32" and ds.attrs["dtype"] == "bfloat16" and ds.attrs["axes"] == "T,head_dim"
        assert f.attrs["format_version"] == 2 and f.attrs["implementation"] == "mine"
        assert "torch" in f.attrs["library_versions"]
    trace = harness.load_trace(path)
    assert trace.names == ["tokens", "layers.0.attention.heads.3.q_rotated"]
    assert torch.equal(trace["layers.0.attention.heads.3.q_rotated"], q.float())  # bf16 -> f32 is exact
    assert trace.dtype("layers.0.attention.heads.3.q_rotated") == "bfloat16"
    assert trace.tokens == [1, 2, 3] and trace.attrs["tokens"] == [1, 2, 3]


def test_name_globs_keep_tokens(tmp_path):
    path = tmp_path / "t.h5"
    with harness.tracing(path, names=["layers.1.*"]):
        harness.record("tokens", torch.tensor([1]))
        harness.record("layers.0.ffn_norm", torch.ones(1, 4))
        harness.record("layers.1.ffn_norm", torch.ones(1, 4))
    assert harness.load_trace(path).names == ["tokens", "layers.1.ffn_norm"]


def test_same_name_twice_is_an_error(tmp_path):
    with pytest.raises(HarnessError, match="recorded twice"):
        with harness.tracing(tmp_path / "t.h5"):
            harness.record("norm", torch.ones(1))
            harness.record("norm", torch.ones(1))
    assert list(tmp_path.iterdir()) == []


def test_failed_run_leaves_existing_file_intact_and_no_temporary(tmp_path):
    path = tmp_path / "t.h5"
    with harness.tracing(path):
        harness.record("norm", torch.ones(3))
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with harness.tracing(path):
            harness.record("norm", torch.zeros(3))
            raise RuntimeError("boom")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.h5"]
    assert not harness.is_tracing(), "the recorder must be removed even when the block fails"


def test_nested_tracing_is_refused(tmp_path):
    with harness.tracing(tmp_path / "a.h5"):
        with pytest.raises(HarnessError, match="already active"):
            with harness.tracing(tmp_path / "b.h5"):
                pass
    assert not (tmp_path / "b.h5").exists()


def test_missing_output_folder(tmp_path):
    with pytest.raises(HarnessError, match="does not exist"):
        with harness.tracing(tmp_path / "nope" / "t.h5"):
            pass


def test_large_tensors_are_stored_compressed_and_exact(tmp_path):
    """Datasets from COMPRESS_MIN_BYTES on are chunked and gzip-compressed; values come back bit for bit."""
    big = torch.randn(256, 256).to(torch.bfloat16)  # 256 KiB as float32
    small = torch.randn(16, 16)
    with harness.tracing(tmp_path / "t.h5"):
        harness.record("layers.0.attention.heads.0.probs", big)
        harness.record("layers.0.attention.heads.0.q", small)
    with h5py.File(tmp_path / "t.h5") as f:
        assert (
            f["/layers/0/attention/heads/0/probs"].compression == "gzip"
            and big.float().numpy().nbytes >= COMPRESS_MIN_BYTES
        )
        assert f["/layers/0/attention/heads/0/q"].compression is None
    trace = harness.load_trace(tmp_path / "t.h5")
    assert torch.equal(trace["layers.0.attention.heads.0.probs"], big.float())
    assert torch.equal(trace["layers.0.attention.heads.0.q"], small)


def test_long_square_tensors_keep_sampled_rows(tmp_path):
    """Past FULL_SQUARE_MAX_T tokens a head's scores/probs keep SAMPLED_ROWS rows (first and last included), with
    their positions; [T, head_dim] tensors stay whole; a version 1 trace still reads."""
    n = FULL_SQUARE_MAX_T + 1
    probs = torch.rand(n, n)
    q = torch.randn(n, 16)
    with harness.tracing(tmp_path / "t.h5"):
        harness.record("layers.0.attention.heads.0.probs", probs)
        harness.record("layers.0.attention.heads.0.q", q)
        harness.record("layers.0.attention.heads.1.probs", probs[:FULL_SQUARE_MAX_T, :FULL_SQUARE_MAX_T])
    trace = harness.load_trace(tmp_path / "t.h5")
    rows = trace.rows("layers.0.attention.heads.0.probs")
    assert len(rows) == SAMPLED_ROWS and rows[0] == 0 and rows[-1] == n - 1 and rows == sorted(set(rows))
    assert torch.equal(trace["layers.0.attention.heads.0.probs"], probs[rows])
    assert trace.rows("layers.0.attention.heads.0.q") is None and torch.equal(trace["layers.0.attention.heads.0.q"], q)
    assert trace.rows("layers.0.attention.heads.1.probs") is None
    trace.close()
    with h5py.File(tmp_path / "t.h5", "a") as f:
        f.attrs["format_version"] = 1
    assert harness.load_trace(tmp_path / "t.h5").shape("layers.0.attention.heads.0.q") == (n, 16)


def test_attributes_keep_their_types_whatever_a_string_looks_like(tmp_path):
    path = tmp_path / "t.h5"
    meta = dict(
        prompt="[1, 2]",
        note='{"a": 1}',
        tokens=[1, 2, 3],
        config={"dim": 8},
        weights=torch.tensor([0.5, 1.5]),
        n_layers=3,
        rope_theta=5e5,
        isolated=False,
    )
    with harness.tracing(path, **meta):
        harness.record("norm", torch.ones(1))
    attrs = harness.load_trace(path).attrs
    assert attrs["prompt"] == "[1, 2]" and attrs["note"] == '{"a": 1}'  # strings stay strings
    assert attrs["tokens"] == [1, 2, 3] and attrs["config"] == {"dim": 8} and attrs["weights"] == [0.5, 1.5]
    assert attrs["n_layers"] == 3 and attrs["rope_theta"] == 5e5 and attrs["isolated"] is False
    assert isinstance(attrs["library_versions"], dict) and "torch" in attrs["library_versions"]
    assert "json_attrs" not in attrs


def test_traces_written_before_json_attrs_existed_still_decode(tmp_path):
    """A format-1 trace of an earlier harness: no json_attrs list, JSON-looking strings decoded as they were."""
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = 1
        f.attrs["tokens"] = "[5, 6]"
        f.attrs["prompt"] = "hello"
        f.attrs["n_layers"] = 2
        f.create_dataset("/norm", data=torch.ones(1).numpy())
    attrs = harness.load_trace(path).attrs
    assert attrs == {"format_version": 1, "tokens": [5, 6], "prompt": "hello", "n_layers": 2}
