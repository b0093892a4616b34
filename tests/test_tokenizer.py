"""The Llama-3 tokenizer against tiktoken used directly with Meta's pattern and special tokens."""

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from harness.tokenizer import PAT_STR, SPECIAL_TOKENS, encode_prompt, load_tokenizer
from harness.runner import DEFAULT_PROMPT

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
    direct = tiktoken.Encoding("direct", pat_str=PAT_STR, mergeable_ranks=ranks,
                               special_tokens={t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)})  # fmt: skip
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


def test_default_prompt_tokenizes_like_the_notebook_short_sequence(tiny_checkpoint):
    enc = load_tokenizer(tiny_checkpoint("3.0") / "tokenizer.model")
    tokens = encode_prompt(enc, DEFAULT_PROMPT)
    assert 10 <= len(tokens) <= 40, len(tokens)  # the tiny BPE was trained on text containing the prompt
