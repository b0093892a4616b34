"""Taps: where a canonical name is read in a module someone else wrote (`output_of`, `input_of`), the layout transforms
that bring it to the harness's shapes, and `llama_taps`, a Llama's whole table from where its modules sit.

An `Adapter` (harness/adapter.py) attaches them. Shapes: T tokens, H query heads, KV kv heads, hd head_dim.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import ModelConfig
from .errors import HarnessError
from .hf_layout import half_split_to_interleaved
from .trace_file import Rows

# A layout transform: `f(x, config) -> x`; one that also takes `start_pos` or `T` (keywords) is given the step's.
Transform = Callable[..., torch.Tensor]
STEP_ARGUMENTS = ("start_pos", "T")
Index = int | str | tuple[int | str, ...]

# ---- layout transforms: each `f(x, config) -> x`, applied in the order a tap lists them ----------------------------


def drop_batch(x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """[1, ...] -> [...]: the harness runs one sequence."""
    if x.shape[0] != 1:
        raise HarnessError(f"adapter: drop_batch expects a batch of 1, got shape {list(x.shape)}")
    return x[0]


def split_heads(count: str = "n_heads") -> Transform:
    """[T, n * hd] -> [n, T, hd], n the config field `count` ("n_heads" for q, "n_kv_heads" for k/v)."""

    def split(x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        return x.unflatten(-1, (getattr(config, count), -1)).transpose(-3, -2)  # [T, n, hd] -> [n, T, hd]

    split.__name__ = f"split_heads({count!r})"
    return split


def split_qkv(part: str) -> Transform:
    """One fused q/k/v projection [..., (H + 2 KV) * hd] -> its `part` ("q", "k" or "v"): q [..., H * hd], k or v
    [..., KV * hd], split by (n_heads * hd, n_kv_heads * hd, n_kv_heads * hd) on the last axis."""
    which = "qkv".index(part)

    def split(x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        sizes = [config.n_heads * config.head_dim] + 2 * [config.n_kv_heads * config.head_dim]
        if x.shape[-1] != sum(sizes):
            raise HarnessError(
                f"split_qkv({part!r}): a fused q/k/v of (n_heads + 2 n_kv_heads) * head_dim = {sum(sizes)} values "
                f"on the last axis expected, got shape {list(x.shape)}"
            )
        return x.split(sizes, dim=-1)[which]

    split.__name__ = f"split_qkv({part!r})"
    return split


def heads_first(x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """[T, n, hd] -> [n, T, hd] (a tensor already viewed per head, tokens first)."""
    return x.transpose(0, 1)


def interleave_halves(x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """q/k in Hugging Face's half-split order (rows permuted for rotate_half) -> Meta's interleaved pairs."""
    return half_split_to_interleaved(x)


def kv_to_query_heads(x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """[KV, ...] -> [H, ...]: query head h gets KV head h // n_rep, the one it attends with."""
    return x.repeat_interleave(config.n_rep, dim=0)


def attended(axis: int = -2) -> Transform:
    """A preallocated cache [..., max_seq_len, ...] -> the positions a step attends, [..., start_pos + T, ...] on
    `axis` (-2: the position axis of [n, K, hd])."""

    def cut(x: torch.Tensor, config: ModelConfig, *, start_pos: int, T: int) -> torch.Tensor:
        return x.narrow(axis, 0, start_pos + T)

    cut.__name__ = f"attended({axis})"
    return cut


def _step_arguments(transform: Transform) -> tuple[str, ...]:
    """Which of `start_pos`, `T` a transform takes (by name, or all through **kwargs), read off its signature."""
    try:
        parameters = inspect.signature(transform).parameters
    except (TypeError, ValueError):  # a builtin without a signature: f(x, config)
        return ()
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return STEP_ARGUMENTS
    return tuple(a for a in STEP_ARGUMENTS if a in parameters)


# ---- taps ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tap:
    """Where a name is read: a submodule path ("model.layers.{layer}.mlp") or a function ("package.module:function").

    `take` "output" or "input"; `index` picks from a tuple output or the inputs: a position, or for inputs a keyword's
    name (`"x"`: found as the call passed it, by keyword or by its position in the signature; a position not passed
    is looked up as a keyword the same way); a tuple reaches into nested tuples (`(1, 0)`: keys of an output
    `(x, (keys, values))`). `call` picks which call of the module or function: the N-th inside the layer running for a
    name with a `{layer}` slot (a shared RoPE on q, then k: 0 then 1), the N-th in the whole run for other names.
    """

    target: str
    take: str = "output"
    index: Index = 0
    transforms: tuple[Transform, ...] = ()
    call: int = 0
    step_arguments: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_arguments", tuple(_step_arguments(t) for t in self.transforms))

    @property
    def is_function(self) -> bool:
        return ":" in self.target

    def value(
        self,
        inputs: tuple,
        output: Any,
        config: ModelConfig,
        *,
        keywords: Mapping[str, Any] | None = None,
        function: Callable | None = None,
        step: Mapping[str, int | None] | None = None,
    ) -> torch.Tensor | Rows:
        """The tapped tensor of one call (positional `inputs`, `keywords`, the `function` called, for its signature),
        transformed; `step`: the `start_pos` and `T` a transform may take."""
        path = self.index if isinstance(self.index, tuple) else (self.index,)
        if self.take == "input":
            picked = _input(inputs, keywords or {}, path[0], function)
            path = path[1:]
        else:
            picked = output
        for i in path:
            picked = _element(picked, i)
        return each(picked, lambda x: self.transformed(x, config, step or {}))

    def transformed(self, x: torch.Tensor, config: ModelConfig, step: Mapping[str, int | None]) -> torch.Tensor:
        x = x.detach()
        for transform, wanted in zip(self.transforms, self.step_arguments):
            extra = {a: step.get(a) for a in wanted}
            if None in extra.values():
                name = getattr(transform, "__name__", repr(transform))
                raise HarnessError(f"{name} takes {', '.join(wanted)}: not known outside an Adapter's run")
            x = transform(x, config, **extra)
        return x


def _element(value: Any, i: int | str) -> Any:
    """Element `i` of a tuple or list; a module's single tensor is itself."""
    if isinstance(i, str):
        raise HarnessError(f"index {i!r} names a keyword input: only input_of reads keywords")
    if not isinstance(value, (tuple, list)):
        return value
    if not -len(value) <= i < len(value):
        raise HarnessError(f"index {i} out of range: the value holds {len(value)} elements")
    return value[i]


def _positional_names(function: Callable | None) -> list[str]:
    """The names a function's inputs may be passed by position, in order ([] when it has no signature to read)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _input(args: tuple, kwargs: Mapping[str, Any], index: int | str, function: Callable | None) -> Any:
    """One input of a call: a position, or a keyword's name, found however the call passed it."""
    if isinstance(index, int) and -len(args) <= index < len(args):
        return args[index]
    names = _positional_names(function)
    name = index if isinstance(index, str) else (names[index] if 0 <= index < len(names) else None)
    if name in kwargs:
        return kwargs[name]
    if name in names and names.index(name) < len(args):
        return args[names.index(name)]
    raise HarnessError(
        f"input {index!r} not passed: called with {len(args)} positional input(s) and keywords {sorted(kwargs)} "
        f"(index= takes a position or a keyword's name)"
    )


def each(value: torch.Tensor | Rows, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | Rows:
    """`f` on a tensor, or on the values of `Rows` (the kept rows of a long tensor computed by blocks)."""
    return value.map(f) if isinstance(value, Rows) else f(value)


def output_of(target: str, *transforms: Transform, index: Index = 0, call: int = 0) -> Tap:
    return Tap(target, "output", index, transforms, call)


def input_of(target: str, *transforms: Transform, index: Index = 0, call: int = 0) -> Tap:
    return Tap(target, "input", index, transforms, call)


# Where a Llama's modules sit, by Meta's module names (llama/model.py); those inside a layer relative to it.
META_PATHS = {
    "tok_embeddings": "tok_embeddings",
    "layers": "layers.{layer}",
    "attention_norm": "attention_norm",
    "wq": "attention.wq",
    "wk": "attention.wk",
    "wv": "attention.wv",
    "wo": "attention.wo",
    "ffn_norm": "ffn_norm",
    "w1": "feed_forward.w1",
    "w3": "feed_forward.w3",
    "w2": "feed_forward.w2",
    "norm": "norm",
}


def llama_taps(
    paths: Mapping[str, str] = META_PATHS, *, half_split: bool = False, qkv: str | None = None
) -> dict[str, Tap]:
    """Every canonical name a Llama's modules give, from where they sit (`paths`: Meta's module names -> the model's,
    missing keys as Meta's). `half_split`: q/k rows permuted for rotate_half (Hugging Face's layout), mapped back.
    `qkv`: the path, inside a layer, of one Linear that projects q, k and v at once (its output split by `split_qkv`);
    then `wq`, `wk`, `wv` are not read.

    What no module returns (rotated q/k, scores, probs) comes from function taps added to this table.
    """
    p = {**META_PATHS, **paths}
    layer, head = p["layers"], "layers.{layer}.attention.heads.{head}"

    def at(key: str) -> str:
        return f"{layer}.{p[key]}"

    def projection(part: str, count: str) -> Tap:  # [1, T, n*hd] (or the fused [1, T, (H + 2 KV)*hd]) -> [n, T, hd]
        fused = (split_qkv(part),) if qkv else ()
        to_query_heads = (kv_to_query_heads,) if count == "n_kv_heads" else ()
        rows = (interleave_halves,) if half_split and part != "v" else ()
        target = f"{layer}.{qkv}" if qkv else at(f"w{part}")
        return output_of(target, drop_batch, *fused, split_heads(count), *to_query_heads, *rows)

    return {
        "embeddings": output_of(p["tok_embeddings"], drop_batch),
        "layers.{layer}.attention_norm": output_of(at("attention_norm"), drop_batch),
        f"{head}.q": projection("q", "n_heads"),
        f"{head}.k": projection("k", "n_kv_heads"),
        f"{head}.v": projection("v", "n_kv_heads"),
        f"{head}.output": input_of(at("wo"), drop_batch, split_heads("n_heads")),  # the heads, concatenated, into wo
        "layers.{layer}.attention.output": output_of(at("wo"), drop_batch),
        "layers.{layer}.attention_residual": input_of(at("ffn_norm"), drop_batch),
        "layers.{layer}.ffn_norm": output_of(at("ffn_norm"), drop_batch),
        "layers.{layer}.feed_forward.gate": output_of(at("w1"), drop_batch),
        "layers.{layer}.feed_forward.up": output_of(at("w3"), drop_batch),
        "layers.{layer}.feed_forward.hidden": input_of(at("w2"), drop_batch),
        "layers.{layer}.feed_forward.output": output_of(at("w2"), drop_batch),
        "layers.{layer}.output": output_of(layer, drop_batch),
        "norm": output_of(p["norm"], drop_batch),
    }
