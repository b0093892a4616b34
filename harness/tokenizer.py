"""The Llama-3 tokenizer: a tiktoken `Encoding` from `tokenizer.model`, Meta's split pattern, 256 special tokens.

A prompt becomes `[<|begin_of_text|>] + encode(prompt)`, as in the notebook.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import tiktoken

from .errors import HarnessError

# Meta's llama3 tokenizer.py
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",  # end of turn
] + [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_RESERVED_SPECIAL_TOKENS - 5)]
BOS = "<|begin_of_text|>"


def encoding_from_ranks(mergeable_ranks: dict[bytes, int], name: str = "llama3") -> tiktoken.Encoding:
    n = len(mergeable_ranks)
    return tiktoken.Encoding(
        name=name,
        pat_str=PAT_STR,
        mergeable_ranks=mergeable_ranks,
        special_tokens={token: n + i for i, token in enumerate(SPECIAL_TOKENS)},
    )


def load_tokenizer(path: str | Path) -> tiktoken.Encoding:
    """Meta's `tokenizer.model` (tiktoken BPE ranks), or an HF `tokenizer.json` of the same byte-level BPE."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: tokenizer file not found")
    ranks = read_ranks(path)
    try:
        return encoding_from_ranks(ranks, name=path.parent.name)
    except ValueError as e:
        raise HarnessError(f"{path}: tiktoken rejected the ranks ({e})") from None


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """The BPE ranks of a `tokenizer.model` or a byte-level BPE `tokenizer.json` (what tiktoken keeps private)."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: tokenizer file not found")
    if path.suffix == ".json":
        return _ranks_from_tokenizer_json(path)
    ranks = read_tokenizer_model(path)
    if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
        raise HarnessError(f"{path}: BPE ranks must be 0..N-1 without gaps")
    return ranks


def read_tokenizer_model(path: Path) -> dict[bytes, int]:
    """Meta's `tokenizer.model` read from the file on every call: one `base64(token) rank` line per token.

    Not tiktoken's `load_tiktoken_bpe`: it caches local files too, keyed by the path string, so a file rewritten at
    the same path would be read with its old content.
    """
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise HarnessError(f"{path}: cannot read the tokenizer ({e.strerror})") from None
    ranks = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:  # not `base64 rank`
            raise HarnessError(
                f"{path}: not a tiktoken BPE file (each line: base64 token, space, rank); "
                f"line {number}: {type(e).__name__}"
            ) from None
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _ranks_from_tokenizer_json(path: Path) -> dict[bytes, int]:
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise HarnessError(f"{path}: not a Hugging Face tokenizer.json with a BPE vocab ({e})") from None
    decode = {c: b for b, c in _bytes_to_unicode().items()}
    try:
        return {bytes(decode[c] for c in token): rank for token, rank in vocab.items()}
    except KeyError as e:
        raise HarnessError(f"{path}: token character {e.args[0]!r} is not byte-level BPE") from None


def token_text_of(enc: tiktoken.Encoding):
    """`text(id)` of one token; ids beyond the tokenizer (benchmark shapes) as <id N>."""

    def text(token: int) -> str:
        if not 0 <= token < enc.n_vocab:
            return f"<id {token}>"
        return enc.decode_single_token_bytes(token).decode("utf-8", errors="replace")

    return text


def encode_prompt(enc: tiktoken.Encoding, prompt: str) -> list[int]:
    """`[<|begin_of_text|>] + encode(prompt)`; special-token text in the prompt becomes that special token, as in HF."""
    return [enc.encode_single_token(BOS)] + enc.encode(prompt, allowed_special="all")


def write_tokenizer_model(ranks: dict[bytes, int], path: str | Path) -> None:
    """Meta's tokenizer.model format: one `base64(token) rank` line per token, in rank order."""
    lines = [
        f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    Path(path).write_text("".join(lines))


def train_tokenizer(text: str, n_merges: int) -> dict[bytes, int]:
    """A small BPE vocabulary trained by tiktoken's own educational trainer (256 byte tokens + `n_merges`)."""
    from tiktoken._educational import bpe_train

    return bpe_train(text, vocab_size=256 + n_merges, pat_str=PAT_STR, visualise=None)
