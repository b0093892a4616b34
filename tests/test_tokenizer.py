"""The Llama-3 tokenizer against tiktoken used directly with Meta's pattern and special tokens."""

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from harness.errors import HarnessError
from harness.run import DEFAULT_PROMPT
from harness.tokenizer import PAT_STR, SPECIAL_TOKENS, encode_prompt, load_tokenizer, read_tokenizer_model

TEXTS = [DEFAULT_PROMPT, "Hello, world! It's 2026.", "café naïve — 東京 🎉", "12345678 spaces   and\n\nnewlines", ""]


def test_special_tokens_follow_the_bpe_ranks(tiny_checkpoint):
    enc = load_tokenizer(tiny_checkpoint("3.0") / "tokenizer.model")
    n = len(load_tiktoken_bpe(str(tiny_checkpoint("3.0") / "tokenizer.model")))
    assert len(SPECIAL_TOKENS) == 256
    assert enc.encode_single_token("<|begin_of_text|>") == n
    assert enc.encode_single_token("<|end_of_text|>") == n + 1
    assert enc.encode_single_token("<|start_header_id|>") == n + 6
    assert enc.encode_single_token("<|end_header_id|>") == n + 7
    assert enc.encode_single_token("<|eot_id|>") == n + 9
    assert enc.encode_single_token("<|reserved_special_token_250|>") == n + 255
    assert enc.n_vocab == n + 256


def test_prompt_is_bos_plus_tiktoken_encoding(tiny_checkpoint):
    path = tiny_checkpoint("3.0") / "tokenizer.model"
    ranks = load_tiktoken_bpe(str(path))
    direct = tiktoken.Encoding(
        "direct",
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)},
    )
    ours = load_tokenizer(path)
    for text in TEXTS:
        assert encode_prompt(ours, text) == [len(ranks)] + direct.encode(text), text
        assert ours.decode(encode_prompt(ours, text)[1:]) == text


def test_empty_prompt_is_just_begin_of_text(tiny_checkpoint):
    enc = load_tokenizer(tiny_checkpoint("3.0") / "tokenizer.model")
    assert encode_prompt(enc, "") == [enc.encode_single_token("<|begin_of_text|>")]


def test_special_token_text_becomes_the_special_token(tiny_checkpoint):
    enc = load_tokenizer(tiny_checkpoint("3.0") / "tokenizer.model")
    assert encode_prompt(enc, "a<|eot_id|>")[-1] == enc.encode_single_token("<|eot_id|>")


@pytest.mark.parametrize("variant", ["3.0", "3.1", "3.2"])
def test_default_prompt_is_the_17_tokens_the_readme_shows(tiny_checkpoint, variant):
    """README's `verify` output says "prompt: 17 tokens": <|begin_of_text|> (512) and 16 BPE tokens of the tiny
    tokenizer, trained on text containing the prompt (the ids measured here, the same for every variant)."""
    enc = load_tokenizer(tiny_checkpoint(variant) / "tokenizer.model")
    tokens = encode_prompt(enc, DEFAULT_PROMPT)
    assert tokens == [512, 300, 293, 275, 260, 382, 284, 277, 327, 44, 260, 331, 44, 278, 335, 271, 32]
    assert len(tokens) == 17 and enc.decode(tokens[1:]) == DEFAULT_PROMPT


def _shifted_ranks(path):
    """The same file with the ranks of the first two tokens swapped: encodes 'a' differently."""
    lines = path.read_text().splitlines()
    (t0, r0), (t1, r1) = lines[0].split(), lines[1].split()
    return "\n".join([f"{t0} {r1}", f"{t1} {r0}"] + lines[2:]) + "\n"


def test_a_tokenizer_rewritten_in_place_is_read_anew(tiny_checkpoint, tmp_path):
    """No cache keyed by the path (tiktoken's load_tiktoken_bpe keeps one): the file's content now is what counts."""
    path = tmp_path / "tokenizer.model"
    path.write_text((tiny_checkpoint("3.0") / "tokenizer.model").read_text())
    before = load_tokenizer(path).encode("\x00\x01")
    path.write_text(_shifted_ranks(path))
    after = load_tokenizer(path).encode("\x00\x01")
    assert before == [0, 1] and after == [1, 0]


def test_a_garbage_tokenizer_replaced_by_a_good_one_loads(tiny_checkpoint, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("this is not base64 at all\n")
    with pytest.raises(HarnessError, match=r"tokenizer.model: not a tiktoken BPE file .*line 1"):
        load_tokenizer(path)
    path.write_text((tiny_checkpoint("3.0") / "tokenizer.model").read_text())
    assert encode_prompt(load_tokenizer(path), "") == [512]  # 512 BPE ranks, then <|begin_of_text|>


def test_reading_the_file_ourselves_gives_tiktoken_s_ranks(tiny_checkpoint):
    path = tiny_checkpoint("3.2") / "tokenizer.model"
    assert read_tokenizer_model(path) == load_tiktoken_bpe(str(path))
