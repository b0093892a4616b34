"""The HF tokenizer made from tokenizer.model by the converter gives our ids on a varied corpus."""

import pytest

from harness.tokenizer import encode_prompt, load_tokenizer

CORPUS = [
    "the answer to the ultimate question of life, the universe, and everything is ",
    "Hello, World! ASCII with punctuation; (parens) [brackets] {braces} <angles> @#$%^&*",
    "café naïve façade résumé Ångström Zürich señor",
    "東京は日本の首都です。中文测试。한국어 텍스트",
    "emoji 🎉🚀👍🏽 and a family 👨‍👩‍👧",
    "digits 1 12 123 1234 12345 3.14159 1,000,000 2026-11-23 12345678901234567890",
    "  \n  \n\t \n   mixed   whitespace \u00a0nbsp\u3000ideographic space",
    "whitespace    runs\t\ttabs   and  double  spaces ",
    "new\nlines\n\n\nand\r\nwindows\r\n",
    "contractions: I'm, you're, he's, we've, they'll, I'd, can't, WON'T, It'S",
    "special tokens in text: <|begin_of_text|>hi<|eot_id|><|start_header_id|>user<|end_header_id|>",
    "<|reserved_special_token_42|> and a fake <|not_special|>",
    "",
    " leading space",
    "trailing spaces   ",
]


@pytest.fixture(scope="module")
def tokenizers(tiny_checkpoint):
    from transformers import AutoTokenizer

    ours = load_tokenizer(tiny_checkpoint("3.0") / "tokenizer.model")
    hf = AutoTokenizer.from_pretrained(tiny_checkpoint("3.0", "hf"))
    return ours, hf


def test_hf_tokenizer_gives_our_ids(tokenizers):
    ours, hf = tokenizers
    for text in CORPUS:
        a, b = encode_prompt(ours, text), hf(text).input_ids
        assert a == b, f"first differing string: {text!r}\n  ours {a}\n  HF   {b}"


def test_the_4x_keyword_would_drop_the_special_tokens(tiny_checkpoint, tokenizers):
    """The trap the converter sets: 4.x's `additional_special_tokens` is silently ignored by 5.x, and parity breaks."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from harness.tokenizer import PAT_STR, SPECIAL_TOKENS

    ours, _ = tokenizers
    wrong = TikTokenConverter(
        vocab_file=str(tiny_checkpoint("3.0") / "tokenizer.model"),
        pattern=PAT_STR,
        additional_special_tokens=SPECIAL_TOKENS,
    ).converted()
    assert wrong.encode("<|eot_id|>").ids != [ours.encode_single_token("<|eot_id|>")]


def test_hf_tokenizer_json_can_stand_in_for_tokenizer_model(tiny_checkpoint):
    """An HF directory without tokenizer.model: our tiktoken encoding rebuilt from tokenizer.json gives the same ids."""
    from_json = load_tokenizer(tiny_checkpoint("3.0", "hf") / "tokenizer.json")
    from_model = load_tokenizer(tiny_checkpoint("3.0") / "tokenizer.model")
    for text in CORPUS:
        assert encode_prompt(from_json, text) == encode_prompt(from_model, text), text
