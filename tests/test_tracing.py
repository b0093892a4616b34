"""The recording API and HDF5 layout: names to paths, dtypes, metadata, filters, atomic writes."""

import h5py
import pytest
import torch

import harness
from harness.errors import HarnessError


def test_record_outside_tracing_is_a_no_op(tmp_path):
    harness.record("embeddings", torch.ones(2))  # nothing open: nothing happens
    assert not harness.is_tracing() and list(tmp_path.iterdir()) == []


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
    from harness.tracing import COMPRESS_MIN_BYTES

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
    import h5py

    from harness.tracing import FULL_SQUARE_MAX_T, SAMPLED_ROWS

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
