"""llama.cpp's compute graph from Python: each node the context's `cb_eval` offers, read as a numpy array (and, in
isolated mode, written back with `ggml_backend_tensor_set`), through ctypes structs written from ggml.h.

llama-cpp-python binds llama.h but not `struct ggml_tensor`: `GgmlTensor` is it, its size checked against
`ggml_tensor_overhead()`. ggml lists sizes fastest-varying first (`ne[0]` is a row's length): an array read here has
the shape `ne` and its values in C order, as a C port's dump would write them (a map's `reverse_shape` reads it back).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import HarnessError

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64  # ggml.h
GGML_OBJECT_SIZE = 32  # ggml.c's struct ggml_object: offs, size, next, type, padding[4]
VIEW_OPS = ("VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE")  # nodes that compute nothing: another node's memory
NUMPY_TYPES = {0: np.float32, 1: np.float16, 30: np.uint16}  # GGML_TYPE_F32, F16, BF16 (read as its 16 high bits)


class GgmlTensor(ctypes.Structure):
    """ggml.h's `struct ggml_tensor` (ggml of llama-cpp-python 0.3.36)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),  # elements per dim, fastest first
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),  # stride in bytes per dim
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


@dataclass(frozen=True)
class Ggml:
    """The few ggml functions the capture calls, from the library llama_cpp loaded."""

    tensor_get: Callable[..., None]  # (tensor, data, offset, size)
    tensor_set: Callable[..., None]  # (tensor, data, offset, size)
    op_name: Callable[[int], bytes]
    nbytes: Callable[[Any], int]


def load_ggml() -> Ggml:
    """ggml's functions through llama_cpp's own handle on libggml; the struct's size checked against the library's."""
    from llama_cpp._ggml import libggml

    def bind(name: str, args: list, result: Any) -> Callable[..., Any]:
        f = getattr(libggml, name)
        f.argtypes, f.restype = args, result
        return f

    tensor = ctypes.POINTER(GgmlTensor)
    overhead = bind("ggml_tensor_overhead", [], ctypes.c_size_t)()
    if overhead != ctypes.sizeof(GgmlTensor) + GGML_OBJECT_SIZE:
        raise HarnessError(
            f"llama.cpp: this libggml's tensors take {overhead} bytes, harness/llamacpp_graph.py's struct "
            f"{ctypes.sizeof(GgmlTensor) + GGML_OBJECT_SIZE}: install llama-cpp-python==0.3.36"
        )
    return Ggml(
        bind("ggml_backend_tensor_get", [tensor, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t], None),
        bind("ggml_backend_tensor_set", [tensor, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t], None),
        bind("ggml_op_name", [ctypes.c_int], ctypes.c_char_p),
        bind("ggml_nbytes", [tensor], ctypes.c_size_t),
    )


def read(ggml: Ggml, t: GgmlTensor) -> np.ndarray:
    """A node's values as float32 of shape `ne` (C order: the last axis fastest, as ggml's ne[0] is). A view reads its
    source's bytes and walks the view's strides, so a transposed cache view reads right too."""
    dtype = NUMPY_TYPES.get(t.type)
    if dtype is None:
        raise HarnessError(f"llama.cpp: node {t.name.decode()!r} holds ggml type {t.type}, not F32, F16 or BF16")
    source = ctypes.cast(t.view_src, ctypes.POINTER(GgmlTensor)).contents if t.view_src else t
    raw = np.empty(ggml.nbytes(ctypes.byref(source)), dtype=np.uint8)  # [bytes]
    ggml.tensor_get(ctypes.byref(source), raw.ctypes.data, 0, raw.size)
    ne, nb = list(t.ne), list(t.nb)
    offset = t.view_offs if t.view_src else 0
    span = offset + sum((n - 1) * s for n, s in zip(ne, nb)) + np.dtype(dtype).itemsize
    values = np.lib.stride_tricks.as_strided(
        raw[offset:span].view(dtype), shape=ne[::-1], strides=nb[::-1]
    )  # [ne3, ne2, ne1, ne0]
    values = np.ascontiguousarray(values)
    if t.type == 30:  # bfloat16: the high half of a float32
        values = (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False).reshape(ne)  # shape ne, C-order values: as a C port writes them


def write(ggml: Ggml, t: GgmlTensor, values: np.ndarray) -> None:
    """Overwrite a contiguous float32 node with `values` (as many): a layer's input replaced by the reference's."""
    data = np.ascontiguousarray(values, dtype=np.float32)
    if t.type != 0 or t.view_src or data.nbytes != ggml.nbytes(ctypes.byref(t)):
        raise HarnessError(
            f"llama.cpp: cannot write {data.size} float32 values into node {t.name.decode()!r} (type {t.type})"
        )
    ggml.tensor_set(ctypes.byref(t), data.ctypes.data, 0, data.nbytes)


@dataclass
class Capture:
    """One `llama_decode`'s `cb_eval`: every node `wants(key)` asks for is read into `tensors` under the keys `NAME`
    (its last node of that name that computes something) and `NAME@OP` (each node of that name: `Qcur-0@MUL_MAT`,
    `Qcur-0@ROPE`); `after(key, values, set)` then sees it, and may write new values into the node through `set`."""

    ggml: Ggml
    wants: Callable[[str], bool]
    after: Callable[[str, np.ndarray, Callable[[np.ndarray], None]], None] | None = None
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    error: BaseException | None = None  # raised in the callback: kept, re-raised after the decode

    def keys(self, t: GgmlTensor) -> list[str]:
        name, op = t.name.decode(), self.ggml.op_name(t.op).decode()
        return [f"{name}@{op}"] if op in VIEW_OPS else [f"{name}@{op}", name]

    def callback(self) -> Any:
        """The `ggml_backend_sched_eval_callback` (keep a reference while the context lives)."""
        from llama_cpp import ggml_backend_sched_eval_callback

        def on_node(pointer: int, ask: bool, user_data: Any) -> bool:
            if self.error is not None:
                return False  # compute the rest without stopping at nodes
            try:
                t = ctypes.cast(pointer, ctypes.POINTER(GgmlTensor)).contents
                keys = [k for k in self.keys(t) if self.wants(k)]
                if ask or not keys:
                    return bool(keys)
                values = read(self.ggml, t)
                for key in keys:
                    self.tensors[key] = values
                    if self.after is not None:
                        self.after(key, values, lambda new: write(self.ggml, t, new))
            except BaseException as e:  # an exception must not cross into C: kept, re-raised by the caller
                self.error = e
            return True

        return ggml_backend_sched_eval_callback(on_node)
