"""Trace an `nn.Module` someone else wrote: a declarative map from canonical names to its submodules or functions.

An `Adapter` is itself a forward of the harness's contract, `adapter(checkpoint, tokens, *, dtype, device) -> logits
[T, V]`: it builds the module, attaches hooks for the run only (removed in `finally:`), runs it and records each
mapped name. Paths have a `{layer}` slot; a name with a `{head}` slot is taken as [H, ...] and recorded per head.
A tapped function may return `Rows` (harness.trace_file) for a long tensor it computes by blocks: the transforms apply
to its values.
Shapes: T tokens, H query heads, KV kv heads, hd head_dim.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import HarnessError
from .hf_layout import half_split_to_interleaved
from .isolation import layer_input
from .recording import record
from .trace_file import Rows

Transform = Callable[[torch.Tensor, ModelConfig], torch.Tensor]

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


def heads_first(x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """[T, n, hd] -> [n, T, hd] (a tensor already viewed per head, tokens first)."""
    return x.transpose(0, 1)


def interleave_halves(x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """q/k in Hugging Face's half-split order (rows permuted for rotate_half) -> Meta's interleaved pairs."""
    return half_split_to_interleaved(x)


def kv_to_query_heads(x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """[KV, ...] -> [H, ...]: query head h gets KV head h // n_rep, the one it attends with."""
    return x.repeat_interleave(config.n_rep, dim=0)


# ---- taps ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tap:
    """Where a name is read: a submodule path ("model.layers.{layer}.mlp") or a function ("package.module:function").

    `take` "output" or "input"; `index` picks from a tuple output or the positional inputs, a tuple of indices from
    nested tuples (`(1, 0)`: keys of an output `(x, (keys, values))`); `call` picks which call of a function inside one
    layer (a function applied to k, then to q: 0 then 1).
    """

    target: str
    take: str = "output"
    index: int | tuple[int, ...] = 0
    transforms: tuple[Transform, ...] = ()
    call: int = 0

    @property
    def is_function(self) -> bool:
        return ":" in self.target

    def value(self, inputs: tuple, output: Any, config: ModelConfig) -> torch.Tensor | Rows:
        picked = inputs if self.take == "input" else output
        for i in self.index if isinstance(self.index, tuple) else (self.index,):
            picked = picked[i] if isinstance(picked, (tuple, list)) else picked  # a module's single tensor: itself

        def transformed(x: torch.Tensor) -> torch.Tensor:
            x = x.detach()
            for transform in self.transforms:
                x = transform(x, config)
            return x

        return _each(picked, transformed)


def _each(value: torch.Tensor | Rows, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | Rows:
    """`f` on a tensor, or on the values of `Rows` (the kept rows of a long tensor computed by blocks)."""
    return value.map(f) if isinstance(value, Rows) else f(value)


def output_of(target: str, *transforms: Transform, index: int | tuple[int, ...] = 0, call: int = 0) -> Tap:
    return Tap(target, "output", index, transforms, call)


def input_of(target: str, *transforms: Transform, index: int | tuple[int, ...] = 0, call: int = 0) -> Tap:
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


def llama_taps(paths: Mapping[str, str] = META_PATHS, *, half_split: bool = False) -> dict[str, Tap]:
    """Every canonical name a Llama's modules give, from where they sit (`paths`: Meta's module names -> the model's,
    missing keys as Meta's). `half_split`: q/k rows permuted for rotate_half (Hugging Face's layout), mapped back.

    What no module returns (rotated q/k, scores, probs) comes from function taps added to this table.
    """
    p = {**META_PATHS, **paths}
    layer, head = p["layers"], "layers.{layer}.attention.heads.{head}"

    def at(key: str) -> str:
        return f"{layer}.{p[key]}"

    qk = (interleave_halves,) if half_split else ()
    q = (drop_batch, split_heads("n_heads"))  # [1, T, H*hd] -> [H, T, hd]
    kv = (drop_batch, split_heads("n_kv_heads"), kv_to_query_heads)  # [1, T, KV*hd] -> [H, T, hd]
    return {
        "embeddings": output_of(p["tok_embeddings"], drop_batch),
        "layers.{layer}.attention_norm": output_of(at("attention_norm"), drop_batch),
        f"{head}.q": output_of(at("wq"), *q, *qk),
        f"{head}.k": output_of(at("wk"), *kv, *qk),
        f"{head}.v": output_of(at("wv"), *kv),
        f"{head}.output": input_of(at("wo"), *q),  # the heads, concatenated, go into wo
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


def _record(name: str, value: torch.Tensor | Rows, config: ModelConfig, prefix: str) -> None:
    if "{head}" not in name:
        record(prefix + name, value)
        return
    if value.shape[0] != config.n_heads:
        raise HarnessError(
            f"adapter: {name} should give one entry per query head ({config.n_heads}), got shape {list(value.shape)}"
        )
    for head in range(config.n_heads):
        record(prefix + name.format(head=head), _each(value, lambda x: x[head]))


def submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        raise HarnessError(f"adapter: the module has no submodule {path!r} (see print(model) for its paths)") from None


def _function(target: str) -> tuple[Any, str]:
    module_name, attr = target.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise HarnessError(f"adapter: cannot import {module_name!r} for the tap {target!r} ({e})") from None
    if not callable(getattr(module, attr, None)):
        raise HarnessError(f"adapter: {module_name} has no function {attr!r} (tap {target!r})")
    return module, attr


# ---- the adapter --------------------------------------------------------------------------------------------------


def _logits_of(output: Any) -> torch.Tensor:
    """Logits from what a model returns: a `.logits` attribute, a tuple's first element, or the tensor itself."""
    logits = getattr(output, "logits", output)
    return logits[0] if isinstance(logits, (tuple, list)) else logits


def run_tokens(module: torch.nn.Module, tokens: torch.Tensor) -> Any:
    """The default call: the module on a batch of one sequence, `module(tokens[None])`."""
    return module(tokens[None])


@dataclass(frozen=True)
class Adapter:
    """An `nn.Module` implementation: how to build it, and where each canonical name sits in it.

    `build(checkpoint, dtype, device)` returns the module with the checkpoint's weights; `layers` is the path of decoder
    layer `{layer}` and `final_norm` of the final norm (isolated mode replaces their inputs, through a forward
    pre-hook that calls `harness.layer_input`); `run(module, tokens)` calls it (default `module(tokens[None])`).
    Generation (`--generate`): `run_step(module, tokens, start_pos, cache)` calls the module on one step's tokens with
    its own KV cache (kept in `cache`, a dict the harness passes back at every step); `cache_taps` are taps read only
    in generation steps (`cache_k`, `cache_v`: what a head attends over). The module is built once per generation, at
    the prefill (`decoder`).
    """

    build: Callable[[Checkpoint, torch.dtype, torch.device], torch.nn.Module]
    taps: Mapping[str, Tap]
    layers: str
    final_norm: str
    run: Callable[[torch.nn.Module, torch.Tensor], Any] = run_tokens
    run_step: Callable[[torch.nn.Module, torch.Tensor, int, dict], Any] | None = None
    cache_taps: Mapping[str, Tap] = dataclasses.field(default_factory=dict)

    def __call__(
        self, checkpoint: Checkpoint, tokens: torch.Tensor, *, dtype: torch.dtype, device: torch.device | str
    ) -> torch.Tensor:
        module = self.build(checkpoint, dtype, torch.device(device))
        with self.attached(module, checkpoint.config):
            logits = _logits_of(self.run(module, tokens.to(device)))
        return logits[0] if logits.dim() == 3 and logits.shape[0] == 1 else logits  # [T, V]

    def decoder(self) -> Callable[..., torch.Tensor]:
        """A generation's decode step (the decode contract), made fresh for each generation: the module, built at the
        prefill, is kept in it; `cache` goes to `run_step` as it is, the implementation's own."""
        module: torch.nn.Module | None = None

        def decode(
            checkpoint: Checkpoint,
            tokens: torch.Tensor,
            *,
            dtype: torch.dtype,
            device: torch.device | str,
            start_pos: int,
            cache: dict,
        ) -> torch.Tensor:
            nonlocal module
            if module is None:
                module = self.build(checkpoint, dtype, torch.device(device))
            with self.attached(module, checkpoint.config, cache=True):
                logits = _logits_of(self.run_step(module, tokens.to(device), start_pos, cache))
            return logits[0] if logits.dim() == 3 and logits.shape[0] == 1 else logits  # [T, V]

        return decode

    @contextmanager
    def attached(
        self,
        root: torch.nn.Module,
        config: ModelConfig,
        *,
        prefix: str = "",
        layer: int | None = None,
        cache: bool = False,
    ) -> Iterator[None]:
        """Hooks and function wrappers on `root` for the duration of the block; names recorded under `prefix`.

        With `layer`, `root` is that one decoder layer (the float64 oracle builds them one at a time): only the taps
        inside a layer are attached, by their paths relative to it. `cache`: the `cache_taps` as well.
        """
        with ExitStack() as stack:
            current = _Layer(layer)
            layers = [layer] if layer is not None else range(config.n_layers)
            if layer is None:
                for index in layers:
                    stack.enter_context(
                        _layer_pre_hook(submodule(root, self.layers.format(layer=index)), index, current)
                    )
                stack.enter_context(_layer_pre_hook(submodule(root, self.final_norm), config.n_layers, current))
            by_function: dict[str, list[tuple[str, Tap]]] = {}
            for name, tap in ({**self.taps, **self.cache_taps} if cache else self.taps).items():
                if tap.is_function:
                    by_function.setdefault(tap.target, []).append((name, tap))
                    continue
                per_layer = "{layer}" in tap.target
                if layer is not None and not per_layer:
                    continue
                for index in layers if per_layer else [None]:
                    path = tap.target.format(layer=index) if per_layer else tap.target
                    if layer is not None:
                        path = path.removeprefix(self.layers.format(layer=index)).removeprefix(".")
                    hook = _module_hook(
                        name.format(layer=index, head="{head}") if per_layer else name, tap, config, prefix
                    )
                    stack.callback(submodule(root, path).register_forward_hook(hook).remove)
            for target, taps in by_function.items():
                stack.enter_context(_wrapped(target, taps, current, config, prefix))
            yield


class _Layer:
    """Which decoder layer is running, and how many times each function was called in it."""

    def __init__(self, fixed: int | None):
        self.index, self.calls = fixed, {}

    def enter(self, index: int) -> None:
        self.index, self.calls = index, {}

    def count(self, target: str) -> int:
        n = self.calls.get(target, 0)
        self.calls[target] = n + 1
        return n


@contextmanager
def _layer_pre_hook(module: torch.nn.Module, index: int, current: _Layer) -> Iterator[None]:
    def pre_hook(mod, args):
        current.enter(index)
        replaced = layer_input(index, args[0])  # isolated mode: the reference's input; otherwise args[0] itself
        return None if replaced is args[0] else (replaced, *args[1:])

    handle = module.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


def _module_hook(name: str, tap: Tap, config: ModelConfig, prefix: str):
    def hook(module, inputs, output) -> None:  # returns None: a forward hook's return value would replace the output
        _record(name, tap.value(inputs, output, config), config, prefix)

    return hook


@contextmanager
def _wrapped(
    target: str, taps: list[tuple[str, Tap]], current: _Layer, config: ModelConfig, prefix: str
) -> Iterator[None]:
    """Replace `package.module:function` for the run by a wrapper that records its inputs/outputs."""
    module, attr = _function(target)
    original = getattr(module, attr)

    def wrapper(*args, **kwargs):
        output = original(*args, **kwargs)
        call = current.count(target)
        for name, tap in taps:
            if tap.call == call:
                if "{layer}" in name and current.index is None:
                    raise HarnessError(f"adapter: {target} was called outside a decoder layer; cannot name {name!r}")
                _record(
                    name.format(layer=current.index, head="{head}"), tap.value(args, output, config), config, prefix
                )
        return output

    setattr(module, attr, wrapper)
    try:
        yield
    finally:
        setattr(module, attr, original)
