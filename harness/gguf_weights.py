"""A GGUF file's weights (llama.cpp's format), dequantized to float32 and read in Meta's names and layout, under the
config and tokenizer of the checkpoint it was converted from: `verify --weights-from MODEL.gguf` (docs/quantized.md).

`open_gguf_weights(path, ckpt)` is a Checkpoint whose `tensor`, `rows` and `take` read the GGUF: the reference, its
float64 oracle, the scratch forward and a user's forward all compute on the same dequantized weights, so a verdict
judges their arithmetic, not the quantization. Only the header is parsed when it opens; a tensor's bytes are read (into
new memory, as Checkpoint's) and dequantized when asked, a block of rows at a time.

Layout: llama.cpp's converter writes HF's q/k rows through `LlamaModel.permute` (conversion/llama.py), which is
`hf_layout.permute_to_meta`: a GGUF's attn_q/attn_k rows are Meta's interleaved pairs already. ggml lists a tensor's
dimensions innermost first (ne[0] = columns): reversed here, a GGUF [cols, rows] is Meta's [rows, cols].
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoint, expected_shape, meta_names
from .errors import HarnessError

# Meta's name -> llama.cpp's (gguf-py's MODEL_TENSOR names for LLM_ARCH_LLAMA), {} for the layer.
GGUF_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "layers.{}.attention.wq.weight": "blk.{}.attn_q.weight",
    "layers.{}.attention.wk.weight": "blk.{}.attn_k.weight",
    "layers.{}.attention.wv.weight": "blk.{}.attn_v.weight",
    "layers.{}.attention.wo.weight": "blk.{}.attn_output.weight",
    "layers.{}.feed_forward.w1.weight": "blk.{}.ffn_gate.weight",
    "layers.{}.feed_forward.w2.weight": "blk.{}.ffn_down.weight",
    "layers.{}.feed_forward.w3.weight": "blk.{}.ffn_up.weight",
    "layers.{}.attention_norm.weight": "blk.{}.attn_norm.weight",
    "layers.{}.ffn_norm.weight": "blk.{}.ffn_norm.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}

# The tensor types gguf-py dequantizes that llama.cpp's converter and llama-quantize write for a Llama (plain and
# k-quants); the i-quants and ternary types are refused by name.
DEQUANTIZED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# The GGUF's own hyperparameters, checked against the checkpoint's config when present: key -> config field.
_HPARAMS = {
    "llama.block_count": "n_layers",
    "llama.embedding_length": "dim",
    "llama.attention.head_count": "n_heads",
    "llama.attention.head_count_kv": "n_kv_heads",
    "llama.feed_forward_length": "ffn_dim",
}


def gguf_name(meta_name: str) -> str:
    """llama.cpp's name of a Meta tensor: "layers.3.attention.wq.weight" -> "blk.3.attn_q.weight"."""
    layer = re.search(r"\.(\d+)\.", meta_name)
    key = meta_name.replace(f".{layer[1]}.", ".{}.", 1) if layer else meta_name
    if key not in GGUF_NAMES:
        raise HarnessError(f"no GGUF name for {meta_name!r}")
    return GGUF_NAMES[key].format(layer[1]) if layer else GGUF_NAMES[key]


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes lie in the file: its ggml type, Meta-order shape [rows, cols] and bytes per row."""

    name: str  # the GGUF's name
    kind: str  # "Q8_0", "F32", ...
    shape: tuple[int, ...]
    offset: int
    row_bytes: int


@dataclass
class GGUFCheckpoint(Checkpoint):
    """A checkpoint's config and tokenizer, a GGUF's weights: `tensor`, `rows` and `take` dequantize (float32) the
    GGUF's tensors in Meta's layout when asked; `gguf` is the file, for an implementation that reads its raw blocks
    itself (tests/data/q8_llama.py). Its fingerprint is the GGUF's sha256."""

    gguf: Path | None = None
    file_type: str | None = None  # general.file_type, as llama.cpp names it ("MOSTLY_Q4_K_M"), when the file says
    _stored: dict[str, Stored] = field(default_factory=dict, repr=False)
    _sha256: str | None = field(default=None, repr=False)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._stored_as(name).shape

    def dtype(self, name: str) -> str:
        self._stored_as(name)
        return "float32"  # what `rows` returns, whatever the stored type

    def quant_type(self, name: str) -> str:
        """The stored ggml type of a Meta tensor: "Q8_0", "Q4_K", "F32", ..."""
        return self._stored_as(name).kind

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start` .. `stop - 1` of a tensor in Meta's layout, read and dequantized now: [stop - start, cols]
        float32."""
        stored = self._stored_as(name)
        n_rows = stored.shape[0]
        if not 0 <= start <= stop <= n_rows:
            raise HarnessError(f"{self.gguf}: rows {start}:{stop} of {name}, which has {n_rows}")
        with open(self.gguf, "rb") as f:
            f.seek(stored.offset + start * stored.row_bytes)
            raw = np.frombuffer(f.read((stop - start) * stored.row_bytes), dtype=np.uint8)
        if len(raw) != (stop - start) * stored.row_bytes:
            raise HarnessError(f"{self.gguf}: truncated: {stored.name} ends past the end of the file")
        return torch.from_numpy(dequantize(raw, stored.kind, (stop - start, *stored.shape[1:])))

    def fingerprint(self) -> str:
        """sha256 of the GGUF file (read once): traces of these weights match each other, not the original's."""
        if self._sha256 is None:
            digest = hashlib.sha256()
            with open(self.gguf, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
            self._sha256 = digest.hexdigest()
        return self._sha256

    def validate(self) -> None:
        for name in self.names():
            self._stored_as(name)

    def types(self) -> str:
        """The stored types of the model's tensors, most used first: "Q8_0 x 23, F32 x 7"."""
        kinds = Counter({s.name: s.kind for s in self._stored.values()}.values())  # tied: token_embd counted once
        return ", ".join(f"{kind} x {n}" for kind, n in kinds.most_common())

    def metadata(self) -> dict[str, Any]:
        """What a trace records of these weights (harness.run.trace_metadata)."""
        return dict(
            weights_from=str(self.gguf), weights_from_sha256=self.fingerprint(), weights_from_types=self.types()
        )

    def _stored_as(self, name: str) -> Stored:
        if name not in self._stored:
            raise HarnessError(f"{self.gguf}: no tensor {name!r} in a Llama-3 checkpoint")
        return self._stored[name]


def dequantize(raw: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """Bytes of whole rows of a tensor of ggml type `kind` -> float32 [shape] (gguf-py's dequantizers)."""
    import gguf

    if kind == "F32":
        return raw.view(np.float32).reshape(shape).copy()
    if kind == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    rows = raw.reshape(shape[0], -1) if len(shape) > 1 else raw[None]  # [R, row bytes]
    values = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[kind])  # [R, cols] float32
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def open_gguf_weights(path: str | Path, ckpt: Checkpoint) -> GGUFCheckpoint:
    """The weights of the GGUF at `path` under `ckpt`'s config and tokenizer, every tensor checked now: present, of a
    type this harness dequantizes, of the shape `ckpt`'s config implies. Bad input: one-line HarnessError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HarnessError(f"{path}: GGUF file not found")
    reader = _reader(path)
    tensors = {t.name: t for t in reader.tensors}
    _check_hparams(path, reader, ckpt)
    stored = {}
    for name in meta_names(ckpt.config):
        stored[name] = _stored(path, tensors, name, ckpt)
    return GGUFCheckpoint(
        ckpt.path,
        "gguf",
        ckpt.config,
        ckpt.tokenizer_path,
        gguf=path.resolve(),
        file_type=_file_type(reader),
        _stored=stored,
    )


def _file_type(reader) -> str | None:
    """What the file was asked to be (llama-quantize's type: a Q4_K_M keeps some tensors Q6_K, and falls back to Q5_0
    where a row is not a multiple of 256), from general.file_type."""
    import gguf

    found = reader.get_field("general.file_type")
    try:
        return None if found is None else gguf.LlamaFileType(int(found.contents())).name
    except ValueError:
        return None


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise HarnessError(
            f"{path}: reading a GGUF needs the gguf package: pip install 'llama3-harness[gguf]'"
        ) from None
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise HarnessError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF with b'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError, IndexError or numpy errors on a bad header
        raise HarnessError(f"{path}: cannot read the GGUF header (truncated or corrupt: {e})") from None


def _check_hparams(path: Path, reader, ckpt: Checkpoint) -> None:
    """The GGUF's own llama.* hyperparameters, where it has them, must be the checkpoint's."""
    for key, attr in _HPARAMS.items():
        found = reader.get_field(key)
        if found is None:
            continue
        value, want = int(found.contents()), getattr(ckpt.config, attr)
        if value != want:
            raise HarnessError(f"{path}: {key} is {value}, the checkpoint {ckpt.path} has {attr} = {want}")


def _stored(path: Path, tensors: dict, name: str, ckpt: Checkpoint) -> Stored:
    """Meta tensor `name` in the GGUF, checked: present (output.weight may be token_embd: tied), dequantizable, shaped
    as the config implies."""
    import gguf

    key = gguf_name(name)
    if key not in tensors and name == "output.weight" and ckpt.config.tie_word_embeddings:
        key = "token_embd.weight"  # tied embeddings: llama.cpp's converter writes no output.weight
    if key not in tensors:
        raise HarnessError(f"{path}: tensor {key!r} ({name}) is missing")
    t = tensors[key]
    kind = t.tensor_type.name
    if kind not in DEQUANTIZED:
        raise HarnessError(
            f"{path}: {key} is {kind}, a type this harness does not dequantize ({', '.join(DEQUANTIZED)})"
        )
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml's ne[] is innermost first
    want = expected_shape(ckpt.config, name)
    if shape != want:
        raise HarnessError(
            f"{path}: {key} has shape {list(shape)} (Meta's order), the checkpoint's config implies {list(want)} for "
            f"{name}"
        )
    block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    if len(shape) == 1 and block > 1:
        raise HarnessError(f"{path}: {key} is a vector stored as {kind}; llama.cpp keeps vectors in F32")
    row_bytes = shape[-1] // block * type_size if len(shape) > 1 else type_size  # a vector's "rows": its elements
    return Stored(key, kind, shape, int(t.data_offset), row_bytes)


def weights_line(trace_path: str | Path) -> str | None:
    """verify's line for a run on a GGUF's weights, from the implementation's trace (None: the checkpoint's own)."""
    from .trace_file import load_trace

    with load_trace(trace_path) as trace:
        attrs = trace.attrs
    if "weights_from" not in attrs:
        return None
    return (
        f"weights: {attrs['weights_from']} ({attrs['weights_from_types']}; sha256 "
        f"{attrs['weights_from_sha256'][:12]}) dequantized to float32: the reference, its float64 oracle and the "
        f"implementation all ran on them"
    )
