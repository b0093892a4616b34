"""Trace an `nn.Module` someone else wrote: a declarative map from canonical names to its submodules or functions.

An `Adapter` is itself a forward of the harness's contract, `adapter(checkpoint, tokens, *, dtype, device) -> logits
[T, V]`: it builds the module, attaches hooks for the run only (removed in `finally:`), runs it and records each
mapped name. Paths have a `{layer}` slot; a name with a `{head}` slot is taken as [H, ...] and recorded per head.
A tapped function may return `Rows` (harness.trace_file) for a long tensor it computes by blocks: the transforms apply
to its values. The transforms and `llama_taps` live in harness/taps.py; this module attaches them.
Shapes: T tokens, H query heads, KV kv heads, hd head_dim.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import HarnessError
from .isolation import layer_input
from .recording import record
from .taps import (
    META_PATHS,
    Tap,
    Transform,
    attended,
    drop_batch,
    each,
    heads_first,
    input_of,
    interleave_halves,
    kv_to_query_heads,
    llama_taps,
    output_of,
    split_heads,
    split_qkv,
)
from .trace_file import Rows

__all__ = [  # the taps and transforms (harness/taps.py) importable from here too, as they were before it existed
    "META_PATHS",
    "Adapter",
    "Tap",
    "Transform",
    "attended",
    "drop_batch",
    "heads_first",
    "input_of",
    "interleave_halves",
    "kv_to_query_heads",
    "llama_taps",
    "output_of",
    "run_tokens",
    "split_heads",
    "split_qkv",
    "submodule",
]


def _record(name: str, value: torch.Tensor | Rows, config: ModelConfig, prefix: str) -> None:
    if "{head}" not in name:
        record(prefix + name, value)
        return
    if value.shape[0] != config.n_heads:
        raise HarnessError(f"should give one entry per query head ({config.n_heads}), got shape {list(value.shape)}")
    for head in range(config.n_heads):
        record(prefix + name.format(head=head), each(value, lambda x: x[head]))


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
        raise HarnessError(f"adapter: cannot import {module_name!r} ({e})") from None
    if not callable(getattr(module, attr, None)):
        raise HarnessError(f"adapter: {module_name} has no function {attr!r}")
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
        with self.attached(module, checkpoint.config, n_tokens=len(tokens)):
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
            with self.attached(module, checkpoint.config, cache=True, start_pos=start_pos, n_tokens=len(tokens)):
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
        start_pos: int = 0,
        n_tokens: int | None = None,
    ) -> Iterator[None]:
        """Hooks and function wrappers on `root` for the duration of the block; names recorded under `prefix`.

        With `layer`, `root` is that one decoder layer (the float64 oracle builds them one at a time): only the taps
        inside a layer are attached, by their paths relative to it. `cache`: the `cache_taps` as well. `start_pos` and
        `n_tokens` (the step's T) go to the transforms that take them. One hook per tapped module, however many layers
        share it: a call is counted (`call=N`) in the layer running, and a shared module's values named after it.
        """
        taps = {**self.taps, **self.cache_taps} if cache else self.taps
        current = _Running(layer, config.n_layers, {"start_pos": start_pos, "T": n_tokens})
        layers = [layer] if layer is not None else range(config.n_layers)
        with ExitStack() as stack:
            if layer is None:
                for index in [*layers, config.n_layers]:
                    path = self.layers.format(layer=index) if index < config.n_layers else self.final_norm
                    stack.enter_context(_layer_pre_hook(submodule(root, path), path, index, current))
            by_module: dict[torch.nn.Module, list[_Site]] = {}
            by_function: dict[str, list[_Site]] = {}
            for name, tap in taps.items():
                if tap.is_function:
                    by_function.setdefault(tap.target, []).append(_Site(name, tap, None))
                elif layer is None or "{layer}" in tap.target:
                    for module, site in self._sites(root, name, tap, layers, layer):
                        by_module.setdefault(module, []).append(site)
            for module, sites in by_module.items():
                hook = _module_hook(sites, current, config, prefix)
                stack.callback(module.register_forward_hook(hook, with_kwargs=True).remove)
            for target, sites in by_function.items():
                stack.enter_context(_wrapped(target, sites, current, config, prefix))
            yield

    def _sites(
        self, root: torch.nn.Module, name: str, tap: Tap, layers, fixed: int | None
    ) -> Iterator[tuple[torch.nn.Module, _Site]]:
        """The module(s) a tap reads, each with its site: a layer's own module named after that layer; a module that
        several layers share (or a path with no `{layer}`) after the layer running when it is called."""
        found: dict[torch.nn.Module, list[int | None]] = {}
        for index in layers if "{layer}" in tap.target else [None]:
            path = tap.target.format(layer=index)
            if fixed is not None:
                path = path.removeprefix(self.layers.format(layer=index)).removeprefix(".")
            with _about(_Site(name, tap, index), index, running=False):
                found.setdefault(submodule(root, path), []).append(index)
        for module, indices in found.items():
            yield module, _Site(name, tap, indices[0] if len(indices) == 1 else None)


@dataclass(frozen=True)
class _Site:
    """A tap as attached: its canonical name, and the layer its module belongs to (None: the layer running)."""

    name: str
    tap: Tap
    layer: int | None

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.name

    def name_at(self, layer: int | None) -> str:
        return self.name.format(layer=layer, head="{head}") if self.per_layer and layer is not None else self.name

    def where(self, layer: int | None, n_layers: int | None = None, *, running: bool = True) -> str:
        """'tap NAME (module PATH, layer L, call N)': which tap, what it reads, where the model was (`running`: in a
        call; otherwise attaching it, where a layer is only that of its path)."""
        kind = "function" if self.tap.is_function else "module"
        path = self.tap.target.format(layer=layer) if layer is not None else self.tap.target
        if not running:
            return f"tap {self.name_at(layer)} ({kind} {path!r}" + ("" if layer is None else f", layer {layer}") + ")"
        at = "before the decoder layers" if layer is None else f"layer {layer}"
        at = "after the decoder layers" if layer is not None and layer == n_layers else at
        return f"tap {self.name_at(layer)} ({kind} {path!r}, {at}, call {self.tap.call})"


@contextmanager
def _about(site: _Site, layer: int | None, n_layers: int | None = None, *, running: bool = True) -> Iterator[None]:
    """A HarnessError inside the block said again with the tap, the module path and the layer it is about."""
    try:
        yield
    except HarnessError as e:
        where = site.where(layer, n_layers, running=running)
        raise HarnessError(f"adapter: {where}: {str(e).removeprefix('adapter: ')}") from None


class _Running:
    """Which decoder layer is running (`n_layers`: the final norm), how many times each tapped module or function was
    called in it and in the whole run, and the step (`start_pos`, `T`) the transforms may take."""

    def __init__(self, fixed: int | None, n_layers: int, step: dict[str, int | None]):
        self.index, self.n_layers, self.step = fixed, n_layers, step
        self.in_layer: dict[Any, int] = {}
        self.in_run: dict[Any, int] = {}

    def enter(self, index: int) -> None:
        self.index, self.in_layer = index, {}

    def count(self, key: Any) -> tuple[int, int]:
        """This call's index among `key`'s calls: in the layer running, and in the run."""
        in_layer, in_run = self.in_layer.get(key, 0), self.in_run.get(key, 0)
        self.in_layer[key], self.in_run[key] = in_layer + 1, in_run + 1
        return in_layer, in_run


def _on_call(
    sites: list[_Site], key: Any, call: tuple, output: Any, current: _Running, config: ModelConfig, prefix: str
) -> None:
    """Record what the sites read from one call (`call`: its args, kwargs and the callable, for its signature). A
    name with a `{layer}` slot counts calls (`call=N`) in the layer running; other names, in the whole run."""
    in_layer, in_run = current.count(key)
    for site in sites:
        if site.tap.call != (in_layer if site.per_layer else in_run):
            continue
        layer = site.layer if site.layer is not None else current.index
        with _about(site, layer, current.n_layers):
            if site.per_layer and (layer is None or layer >= current.n_layers):
                raise HarnessError("called outside the decoder layers: no layer to name it after")
            args, kwargs, function = call
            value = site.tap.value(args, output, config, keywords=kwargs, function=function, step=current.step)
            _record(site.name_at(layer), value, config, prefix)


def _first_input(args: tuple, kwargs: dict, function: Callable) -> tuple[Any, str | None]:
    """A call's first input, and the keyword it was passed as (None: positional)."""
    if args:
        return args[0], None
    try:
        first = next(iter(inspect.signature(function).parameters), None)
    except (TypeError, ValueError):
        first = None
    if first not in kwargs:
        raise HarnessError(f"called with no input: no positional one, keywords {sorted(kwargs)}")
    return kwargs[first], first


@contextmanager
def _layer_pre_hook(module: torch.nn.Module, path: str, index: int, current: _Running) -> Iterator[None]:
    def pre_hook(mod, args, kwargs):
        current.enter(index)
        try:
            x, keyword = _first_input(args, kwargs, mod.forward)
        except HarnessError as e:
            raise HarnessError(f"adapter: the layer input of {path!r} (layer {index}): {e}") from None
        replaced = layer_input(index, x)  # isolated mode: the reference's input; otherwise x itself
        if replaced is x:
            return None
        return ((replaced, *args[1:]), kwargs) if keyword is None else (args, {**kwargs, keyword: replaced})

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _module_hook(sites: list[_Site], current: _Running, config: ModelConfig, prefix: str):
    def hook(module, args, kwargs, output) -> None:  # returns None: a forward hook's return value replaces the output
        _on_call(sites, module, (args, kwargs, module.forward), output, current, config, prefix)

    return hook


@contextmanager
def _wrapped(target: str, sites: list[_Site], current: _Running, config: ModelConfig, prefix: str) -> Iterator[None]:
    """Replace `package.module:function` for the run by a wrapper that records its inputs/outputs."""
    with _about(sites[0], None, running=False):
        module, attr = _function(target)
    original = getattr(module, attr)

    def wrapper(*args, **kwargs):
        output = original(*args, **kwargs)
        _on_call(sites, target, (args, kwargs, original), output, current, config, prefix)
        return output

    setattr(module, attr, wrapper)
    try:
        yield
    finally:
        setattr(module, attr, original)
