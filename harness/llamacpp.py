"""`--impl llamacpp:MODEL.gguf`: llama.cpp (llama-cpp-python 0.3.36) run as an implementation of the contract, every
graph node it computes recorded under its canonical name through the map harness/data/llamacpp.toml (docs/ports.md).

The traps of a tensor comparison are set right here: an F32 KV cache (llama.cpp's default is F16), flash attention off
(it fuses the scores and probs away and casts K/V to F16), the GGUF's type matched to the run's --dtype (the CPU matmul
rounds activations to the weight type), one thread count, stated. `--isolated` writes the reference's layer input into
the graph; `--generate` runs each step through llama.cpp's own KV cache.
"""

from __future__ import annotations

import fnmatch
import logging
import sys
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import names as canon
from .checkpoint import Checkpoint
from .config import ModelConfig
from .dump_map import Context, DumpMap, load_map
from .errors import HarnessError
from .isolation import layer_input
from .llamacpp_graph import Capture, load_ggml
from .recording import record

INSTALL = (
    "pip install llama-cpp-python==0.3.36 (it compiles llama.cpp: about 20 minutes on 2 cores), or tox -e llamacpp"
)
MAP = Path(__file__).parent / "data" / "llamacpp.toml"
THREADS = 2  # llama.cpp's threads, by default; `llamacpp:MODEL.gguf?threads=N` sets it
GGML_TYPE_F32 = 0  # the KV cache's type (llama.cpp's default, F16, made an F32 GGUF fail at `scores`, 129x)
FLASH_ATTENTION_OFF = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED (its default, AUTO, is on for the CPU)

# The GGUF's file type (general.file_type) -> (its name, the --dtype a run of it is judged in). The CPU matmul rounds
# its activations to the weights' type (F16, BF16), or for a quantized type to 8-bit blocks (Q8_0, Q8_K), whose
# rounding is bfloat16's order: a Q8_0 GGUF passed the bfloat16 bound (0.968 of it), failed the float32 one (2e3x).
FILE_TYPES = {0: ("F32", "float32"), 1: ("F16", "float16"), 32: ("BF16", "bfloat16")}
QUANTIZED = {7: "Q8_0", 2: "Q4_0", 10: "Q2_K", 12: "Q3_K_M", 14: "Q4_K_S", 15: "Q4_K_M", 17: "Q5_K_M", 18: "Q6_K"}


def dtype_for(file_type: int) -> tuple[str, str]:
    """(the GGUF type's name, the --dtype its run is judged in): float32 for F32, float16 for F16, bfloat16 for BF16
    and for every quantized type."""
    return FILE_TYPES.get(file_type) or (QUANTIZED.get(file_type, f"type {file_type}"), "bfloat16")


def check_dtype(gguf: str, file_type: int, dtype: str) -> None:
    """One line when the run's dtype is not the one the GGUF's type is judged in."""
    name, wanted = dtype_for(file_type)
    if dtype != wanted:
        raise HarnessError(
            f"{gguf}: an {name} GGUF is judged with --dtype {wanted} (llama.cpp's CPU matmul rounds activations to "
            f"the weights' type), not {dtype}: pass --dtype {wanted}"
        )


def import_llama_cpp() -> Any:
    """llama_cpp, imported when first needed; missing: one line saying how to get it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise HarnessError(f"--impl llamacpp: needs the llama_cpp module ({e}): {INSTALL}") from None
    return llama_cpp


@contextmanager
def quiet() -> Any:
    """llama.cpp's log lines (each tensor loaded, each context made) only at ERROR, for the block."""
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def free_quietly(free: Any, pointer: Any) -> None:
    """A model or context freed (by its finalizer) without llama.cpp's log lines."""
    with quiet():
        free(pointer)


# ---- the spec, the model, its checks -------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[Path, int]:
    """`llamacpp:MODEL.gguf[?threads=N]` -> (the GGUF's path, llama.cpp's thread count)."""
    path, _, query = spec.removeprefix("llamacpp:").partition("?")
    threads = THREADS
    if query:
        key, _, value = query.partition("=")
        if key != "threads" or not value.isdigit() or int(value) < 1:
            raise HarnessError(f"--impl {spec}: expected llamacpp:MODEL.gguf or llamacpp:MODEL.gguf?threads=N")
        threads = int(value)
    if not path.endswith(".gguf") or not Path(path).is_file():
        what = "not found" if not Path(path).exists() else "is not a .gguf file"
        raise HarnessError(f"--impl {spec}: {path} {what} (python -m harness gguf CHECKPOINT --out MODEL.gguf)")
    return Path(path), threads


@dataclass
class Model:
    """A loaded GGUF: llama_cpp, its model pointer (freed with this object), its file type, the threads to run on."""

    lib: Any
    path: Path
    pointer: Any
    file_type: int
    threads: int

    @classmethod
    def load(cls, path: Path, threads: int) -> Model:
        lib = import_llama_cpp()
        with quiet():
            lib.llama_backend_init()
            params = lib.llama_model_default_params()
            params.n_gpu_layers = 0
            pointer = lib.llama_model_load_from_file(str(path).encode(), params)
        if not pointer:
            raise HarnessError(f"{path}: llama.cpp could not load this GGUF (a Llama model of a known type?)")
        model = cls(lib, path, pointer, lib.llama_model_ftype(pointer), threads)
        weakref.finalize(model, free_quietly, lib.llama_model_free, pointer)
        return model

    def shape(self) -> dict[str, int]:
        lib, m = self.lib, self.pointer
        return dict(
            n_layers=lib.llama_model_n_layer(m),
            dim=lib.llama_model_n_embd(m),
            n_heads=lib.llama_model_n_head(m),
            n_kv_heads=lib.llama_model_n_head_kv(m),
            vocab_size=lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(m)),
        )

    def check(self, config: ModelConfig) -> None:
        """One line when the GGUF is not of the checkpoint's shape."""
        mine = self.shape()
        theirs = {key: getattr(config, key) for key in mine}
        if mine != theirs:
            show = lambda d: ", ".join(f"{k} {v}" for k, v in d.items())
            raise HarnessError(
                f"{self.path}: the GGUF has {show(mine)}; the checkpoint {show(theirs)}: convert this checkpoint "
                f"(python -m harness gguf CHECKPOINT --out MODEL.gguf)"
            )

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokens of `text`, `<|begin_of_text|>` added and special tokens parsed (not its default)."""
        lib, data = self.lib, text.encode()
        room = len(data) + 8
        ids = (lib.llama_token * room)()
        n = lib.llama_tokenize(lib.llama_model_get_vocab(self.pointer), data, len(data), ids, room, True, True)
        return list(ids[: max(n, 0)])


# ---- a context: llama.cpp's KV cache, and the graph callback that reads (and in isolated mode writes) its nodes ----


class Session:
    """One llama.cpp context over the model: its KV cache holds positions 0 .. `next_pos` - 1. Freed with the object."""

    def __init__(self, model: Model, n_ctx: int, n_batch: int):
        lib = model.lib
        self.model, self.next_pos = model, 0
        self.capture = Capture(load_ggml(), wants=lambda key: False)
        self.callback = self.capture.callback()  # referenced here while the context lives
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n_ctx, n_batch, n_batch, 1
        params.n_threads = params.n_threads_batch = model.threads
        params.type_k = params.type_v = GGML_TYPE_F32
        params.flash_attn_type = FLASH_ATTENTION_OFF
        params.cb_eval, params.cb_eval_user_data = self.callback, None
        params.no_perf = True
        with quiet():
            self.pointer = lib.llama_init_from_model(model.pointer, params)
        if not self.pointer:
            raise HarnessError(f"{model.path}: llama.cpp could not make a context of {n_ctx} positions")
        self.n_ctx = lib.llama_n_ctx(self.pointer)
        weakref.finalize(self, free_quietly, lib.llama_free, self.pointer)

    def decode(self, tokens: list[int], start_pos: int) -> np.ndarray:
        """Run `tokens` at positions start_pos ..: every position's logits [T, V] (the capture keeps its own error)."""
        lib, n = self.model.lib, len(tokens)
        if start_pos != self.next_pos or start_pos + n > self.n_ctx:
            raise HarnessError(
                f"llama.cpp: a step of {n} tokens at position {start_pos}, but its context ran {self.next_pos} "
                f"positions of the {self.n_ctx} it holds (a generation: the prompt's and {DECODE_ROOM} more)"
            )
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, start_pos + i, 1, 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = n
            with quiet():
                status = lib.llama_decode(self.pointer, batch)
        finally:
            lib.llama_batch_free(batch)
        if status != 0 and self.capture.error is None:
            raise HarnessError(f"{self.model.path}: llama_decode returned {status}")
        self.next_pos = start_pos + n
        vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model.pointer))
        return np.ctypeslib.as_array(lib.llama_get_logits(self.pointer), shape=(n * vocab,)).reshape(n, vocab).copy()


def isolate(n_layers: int, n_tokens: int):
    """The capture's `after`: each layer's input (`embd` into layer 0, `l_out-L` into L + 1, the last into the final
    norm) replaced by `harness.layer_input`'s, when it differs (isolated mode; elsewhere it is the same tensor)."""

    def after(key: str, values: np.ndarray, write) -> None:
        if key == "embd":
            layer = 0
        elif key.startswith("l_out-") and key[6:].isdigit():
            layer = int(key[6:]) + 1
        else:
            return
        x = torch.from_numpy(values).reshape(n_tokens, -1)  # [T, dim]
        given = layer_input(layer, x)
        if given is not x:
            write(given.detach().float().cpu().numpy())

    return after


# ---- the implementation: `--impl llamacpp:MODEL.gguf` ---------------------------------------------------------------

DECODE_ROOM = 1024  # positions a generation's context holds past its prompt (llama.cpp's KV cache does not grow)


def llamacpp_forward(
    spec: str, *, names: list[str] | None = None
) -> tuple[Callable[..., torch.Tensor], dict, Callable]:
    """`llamacpp:MODEL.gguf[?threads=N]`, loaded and ready: (its forward, which keeps the decode contract
    (`--generate`), the trace metadata, and the check of a run's checkpoint, dtype and device made before any work);
    harness.implementation.resolve makes the Implementation.
    `names`: globs of the canonical names to read out of the graph (default: all; a long prompt's scores are big)."""
    path, threads = parse_spec(spec)
    model = Model.load(path, threads)
    dump_map = load_map(MAP)

    def wanted(key: str) -> bool:
        found = dump_map.match(key)
        name = found[0].replace("{head}", "0") if found else None
        if name is None:
            return False
        layer_inputs = key == "embd" or key.startswith("l_out-")  # read in isolated mode, whatever `names` says
        return names is None or layer_inputs or any(fnmatch.fnmatchcase(name, p) for p in names)

    metadata = {
        "gguf": str(path.resolve()),
        "gguf_type": dtype_for(model.file_type)[0],
        "llama_cpp_python": model.lib.__version__,
        "threads": threads,
        "kv_cache": "F32",
        "flash_attention": "off",
    }

    def forward(
        checkpoint: Checkpoint, tokens: torch.Tensor, *, dtype: torch.dtype, device: Any, start_pos: int = 0, cache=None
    ) -> torch.Tensor:
        config, ids = checkpoint.config, [int(t) for t in tokens.tolist()]  # [T]
        precheck(checkpoint, str(dtype).removeprefix("torch."), str(device))
        if start_pos == 0:
            tokenization_notice(model, checkpoint, ids)
        session = session_for(model, config, cache, len(ids))
        capture = session.capture
        capture.wants = wanted
        capture.after, capture.tensors, capture.error = isolate(config.n_layers, len(ids)), {}, None
        logits = session.decode(ids, start_pos)  # [T, V]
        record_nodes(capture.tensors, dump_map, config, len(ids), start_pos, in_step=cache is not None)
        if capture.error is not None:  # raised in the graph callback (a --layers range's end, a bad layer input)
            raise capture.error
        return torch.from_numpy(logits)  # [T, V] float32

    def precheck(checkpoint: Checkpoint, dtype: str, device: str) -> None:
        """What the run refuses, said before the reference runs: the device, the dtype, the model's shape."""
        if device != "cpu":
            raise HarnessError(f"--impl {spec}: llama.cpp runs on the CPU here (its own threads): pass --device cpu")
        check_dtype(str(path), model.file_type, dtype)
        model.check(checkpoint.config)

    return forward, metadata, precheck


def session_for(model: Model, config: ModelConfig, cache: dict | None, n: int) -> Session:
    """A fresh context for one forward; in a generation, the one in the decode contract's `cache`, made at step 0."""
    if cache is None:
        return Session(model, n_ctx=n, n_batch=n)
    if "llama.cpp" not in cache:
        cache["llama.cpp"] = Session(model, n_ctx=min(config.max_seq_len, n + DECODE_ROOM), n_batch=n)
    return cache["llama.cpp"]


def tokenization_notice(model: Model, checkpoint: Checkpoint, ids: list[int]) -> None:
    """One line on stderr when llama.cpp's tokenizer splits the prompt otherwise than the harness's (the run feeds
    the harness's tokens either way)."""
    from .tokenizer import encode_prompt, load_tokenizer

    if checkpoint.tokenizer_path is None:
        return
    enc = load_tokenizer(checkpoint.tokenizer_path)
    if any(t >= enc.n_vocab for t in ids) or encode_prompt(enc, text := enc.decode(ids[1:])) != ids:
        return  # no prompt text gives these tokens
    theirs = model.tokenize(text)
    if theirs != ids:
        at = next((i for i, (a, b) in enumerate(zip(ids, theirs)) if a != b), min(len(ids), len(theirs)))
        print(
            f"note: llama.cpp tokenizes this prompt into {len(theirs)} tokens, the harness into {len(ids)} (first "
            f"difference at position {at}); the run feeds llama.cpp the harness's tokens",
            file=sys.stderr,
        )


# ---- the nodes read, recorded under their canonical names ----------------------------------------------------------


def record_nodes(
    tensors: dict[str, np.ndarray], dump_map: DumpMap, config: ModelConfig, n: int, start_pos: int, in_step: bool
) -> None:
    """Each node the map names, in canonical order, transformed and its shape checked: `n` the step's tokens at
    start_pos ..; a [T, K] name is sliced to K = start_pos + n; a step's KV cache only in a generation step."""
    found = []
    for key in tensors:
        if (match := dump_map.match(key)) is not None:
            one = match[0].replace("{head}", "0")
            if in_step or not canon.part(one).steps_only:
                found.append((canon.order_key(one), key, *match))
    for _, key, name, steps in sorted(found):
        one = name.replace("{head}", "0")
        x = torch.from_numpy(tensors[key])
        ctx = Context(config, start_pos + n if "K" in canon.part(one).axes else n)
        for spec, step in steps:
            try:
                x = step(x, ctx)
            except (HarnessError, RuntimeError, ValueError, IndexError) as e:
                raise HarnessError(f"{MAP.name}: node {key!r}: transform {spec!r} failed ({e})") from None
        shape = canon.shape_of(canon.step_name(0, one) if in_step else one, config, n, start_pos)  # K: in a step
        want = (config.n_heads, *shape) if "{head}" in name else shape
        if tuple(x.shape) != want:
            raise HarnessError(f"{MAP.name}: node {key!r} -> {name!r}: shape {list(x.shape)}, expected {list(want)}")
        for head in range(config.n_heads) if "{head}" in name else [None]:
            record(name.replace("{head}", str(head)), x if head is None else x[head])
