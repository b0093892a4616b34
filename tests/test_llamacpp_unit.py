"""`--impl llamacpp:` without llama.cpp: its map (harness/data/llamacpp.toml) parses and names every canonical name,
and brings nodes in ggml's layout back to the canonical one; the dtype rule; one line when llama_cpp or the converter
is missing. The runs themselves: examples/tests/test_llamacpp.py (`tox -e llamacpp`)."""

import json
import sys

import pytest
import torch

from harness import names as canon
from harness.config import ModelConfig
from harness.dump_map import load_map
from harness.errors import HarnessError
from harness.gguf_convert import check_split_regex, find_script, judged_with
from harness.implementation import resolve
from harness.llamacpp import MAP, check_dtype, dtype_for, parse_spec, record_nodes
from harness.recording import tracing
from harness.tokenizer import PAT_STR
from harness.trace_file import load_trace
from tests.helpers import assert_expected

# tiny 3.0's shape: grouped-query attention, 8 query heads on 2 KV heads
CONFIG = ModelConfig(
    dim=128,
    n_layers=3,
    n_heads=8,
    n_kv_heads=2,
    vocab_size=768,
    ffn_dim=448,
    norm_eps=1e-5,
    rope_theta=5e5,
    rope_scaling=None,
    tie_word_embeddings=False,
    max_seq_len=8192,
    head_dim=16,
)


def _entries():
    return load_map(MAP).entries


def test_the_map_names_every_canonical_name_once():
    """One node for each canonical part (the tokens are the run's own), a step's KV cache included."""
    named = [e.name.replace("{layer}", "0").replace("{head}", "0") for e in _entries()]
    every = [n for n in canon.canonical_names(1, 1, steps=0) if n != "tokens"]
    assert sorted(canon.split_step(n)[1] for n in every) == sorted(named)


@pytest.mark.parametrize(
    "key, name",
    [
        ("embd", "embeddings"),
        ("Qcur-2@MUL_MAT", "layers.2.attention.heads.{head}.q"),
        ("Qcur-2@ROPE", "layers.2.attention.heads.{head}.q_rotated"),
        ("Qcur-2", None),  # the last node of that name (the ROPE): selected by op instead
        ("ffn_out-0@MUL_MAT", "layers.0.feed_forward.output"),
        ("ffn_out-0@ADD", None),
        ("l_out-11", "layers.11.output"),
        ("cache_v_l1 (view)@VIEW", "layers.1.attention.heads.{head}.cache_v"),
        ("kq_soft_max-0", "layers.0.attention.heads.{head}.probs"),
    ],
)
def test_the_map_selects_nodes_by_name_and_op(key, name):
    found = load_map(MAP).match(key)
    assert (found[0] if found else None) == name


def _ggml(x: torch.Tensor) -> torch.Tensor:
    """`x` [a, .., z] as llama.cpp's capture hands it: padded to 4 dims in front, shape ne = [z, .., a] (C order)."""
    four = x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))
    return four.reshape(tuple(reversed(four.shape)))


def test_nodes_in_ggmls_layout_come_back_canonical(tmp_path):
    """Made by hand from known per-head tensors: a GQA model's q/k/v projections, rotated k, the scores over a padded
    cache before the scale, each head's output, and in a generation step its transposed V cache."""
    config = CONFIG
    H, KV, hd, D, T, cells = config.n_heads, config.n_kv_heads, config.head_dim, config.dim, 5, 256
    q, k = torch.randn(H, T, hd), torch.randn(KV, T, hd)  # [H, T, hd], [KV, T, hd]
    scores, output = torch.randn(H, T, cells), torch.randn(H, T, hd)  # [H, T, cells] unscaled, [H, T, hd]
    nodes = {
        "embd": _ggml(torch.arange(T * D, dtype=torch.float32).reshape(T, D)),
        "Qcur-0@MUL_MAT": _ggml(q.transpose(0, 1).reshape(T, H * hd)),  # [T, H * hd]
        "Kcur-0@ROPE": _ggml(k.transpose(0, 1)),  # [T, KV, hd]
        "kq-0": _ggml(scores),
        "kqv-0": _ggml(output),
        "Qcur-0": _ggml(torch.zeros(T, H, hd)),  # not in the map: left out
    }
    with tracing(tmp_path / "t.h5", dtype="float32"):
        record_nodes({key: x.numpy() for key, x in nodes.items()}, load_map(MAP), config, T, 0, in_step=False)
    with load_trace(tmp_path / "t.h5") as trace:
        assert_expected(trace["embeddings"], torch.arange(T * D, dtype=torch.float32).reshape(T, D))
        for head in range(H):
            at = f"layers.0.attention.heads.{head}."
            assert_expected(trace[at + "q"], q[head], what=at + "q")
            assert_expected(trace[at + "k_rotated"], k[head // (H // KV)], what=at + "k_rotated")
            assert_expected(trace[at + "scores"], scores[head, :, :T] / hd**0.5, rtol=1e-6, what=at + "scores")
            assert_expected(trace[at + "output"], output[head], what=at + "output")


def test_a_steps_cache_reads_its_first_k_cells(tmp_path):
    """Decode step at position 7 (T = 1, K = 8): the V cache is stored transposed, [hd, KV, cells]."""
    config = CONFIG
    H, KV, hd, cells = config.n_heads, config.n_kv_heads, config.head_dim, 256
    v = torch.randn(KV, cells, hd)  # [KV, cells, hd]
    nodes = {"cache_v_l2 (view)@VIEW": _ggml(v.permute(2, 0, 1)).numpy()}  # [hd, KV, cells]
    with tracing(tmp_path / "t.h5", dtype="float32"):
        record_nodes(nodes, load_map(MAP), config, 1, 7, in_step=True)
        record_nodes(nodes, load_map(MAP), config, 1, 7, in_step=False)  # outside a step: not a name
    with load_trace(tmp_path / "t.h5") as trace:
        assert [n for n in trace.names if "cache" in n] == [f"layers.2.attention.heads.{h}.cache_v" for h in range(H)]
        assert_expected(trace["layers.2.attention.heads.5.cache_v"], v[5 // (H // KV), :8])


def test_a_node_of_another_shape_is_one_line(tmp_path):
    config = CONFIG
    with tracing(tmp_path / "t.h5", dtype="float32"), pytest.raises(HarnessError, match="node 'attn_out-0'"):
        record_nodes({"attn_out-0": torch.zeros(config.dim + 1, 3, 1, 1).numpy()}, load_map(MAP), config, 3, 0, False)


@pytest.mark.parametrize(
    "file_type, name, dtype",
    [(0, "F32", "float32"), (32, "BF16", "bfloat16"), (1, "F16", "float16"), (7, "Q8_0", "bfloat16")],
)
def test_the_dtype_rule(file_type, name, dtype):
    """The CPU matmul rounds activations to the weight type: each GGUF type is judged in one dtype."""
    assert dtype_for(file_type) == (name, dtype)
    check_dtype("m.gguf", file_type, dtype)
    other = "float16" if dtype != "float16" else "float32"
    with pytest.raises(HarnessError, match=f"an {name} GGUF is judged with --dtype {dtype} .*pass --dtype {dtype}$"):
        check_dtype("m.gguf", file_type, other)


def test_the_converters_types_follow_the_rule():
    assert [judged_with(t) for t in ("f32", "bf16", "f16", "q8_0", "q4_k_m")] == [
        "float32",
        "bfloat16",
        "float16",
        "bfloat16",
        "bfloat16",
    ]


def test_without_llama_cpp_one_line_says_how_to_get_it(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(HarnessError, match=r"needs the llama_cpp module .*pip install llama-cpp-python==0\.3\.36"):
        resolve(f"llamacpp:{gguf}")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("llamacpp:nowhere.gguf", "nowhere.gguf not found"),
        ("llamacpp:{tmp}/m.gguf?threads=0", "expected llamacpp:MODEL.gguf or llamacpp:MODEL.gguf\\?threads=N"),
        ("llamacpp:{tmp}/m.bin", "is not a .gguf file"),
    ],
)
def test_a_bad_spec_is_one_line(spec, message, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "m.bin").write_bytes(b"GGUF")
    with pytest.raises(HarnessError, match=message):
        parse_spec(spec.replace("{tmp}", str(tmp_path)))
    assert parse_spec(f"llamacpp:{tmp_path}/m.gguf?threads=3")[1] == 3


def test_without_the_converter_one_line_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_CONVERTER", raising=False)
    with pytest.raises(HarnessError, match=r"needs llama\.cpp's convert_hf_to_gguf\.py: pass --converter PATH"):
        with find_script(None):
            pass
    with pytest.raises(HarnessError, match=r"no convert_hf_to_gguf\.py there"):
        with find_script(tmp_path):
            pass


def test_the_split_regex_is_checked_before_the_converter_is_told_llama_bpe(tmp_path):
    split = {"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated"}
    pre = {"type": "Sequence", "pretokenizers": [split, {"type": "ByteLevel"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": pre}))
    check_split_regex(tmp_path)
    split["pattern"]["Regex"] = r"\w+"
    (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": pre}))
    with pytest.raises(HarnessError, match=r"splits with '\\\\w\+', not Llama-3's"):
        check_split_regex(tmp_path)


class _SplitsSpecialText:
    """A Model's tokenizer with llama-cpp-python's default, special-token text split into pieces."""

    def tokenize(self, text: str) -> list[int]:
        return [1, 2, 3]


def test_a_prompt_llama_cpp_tokenizes_otherwise_is_said_in_one_line(tiny_checkpoint, capsys):
    from harness.checkpoint import open_checkpoint
    from harness.llamacpp import tokenization_notice
    from harness.run import prompt_tokens

    checkpoint = open_checkpoint(tiny_checkpoint("3.0"))
    ids = prompt_tokens(checkpoint, "The answer is<|eot_id|>")
    tokenization_notice(_SplitsSpecialText(), checkpoint, ids)
    assert capsys.readouterr().err == (
        f"note: llama.cpp tokenizes this prompt into 3 tokens, the harness into {len(ids)} (first difference at "
        f"position 0); the run feeds llama.cpp the harness's tokens\n"
    )
