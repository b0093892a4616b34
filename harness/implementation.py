"""`--impl`: the implementation a run traces, by name (`scratch`, `reference`), `MODULE:ATTR` or `path/to/file.py:ATTR`.

Every implementation is one contract: `forward(checkpoint, tokens, *, dtype, device) -> logits [T, V]`, recording
canonical names with `harness.record`. A function in the notebook's style is one; so is an `Adapter`
(harness/adapter.py).
Generation (`--generate`) adds two keywords, the decode contract: `forward(checkpoint, tokens, *, dtype, device,
start_pos, cache) -> logits [T, V]` for the step's T new tokens at positions start_pos ..; `cache` is a dict, empty at
the prefill, the same dict at every later step, for the implementation's own KV cache (and nothing of the harness's).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import HarnessError

Forward = Callable[..., torch.Tensor]  # forward(checkpoint, tokens, *, dtype, device) -> logits [T, V]


@dataclass(frozen=True)
class Implementation:
    """What `--impl` named, ready to call; `metadata` goes into the trace's attributes."""

    name: str
    forward: Forward
    metadata: dict[str, Any] = field(default_factory=dict)
    decoder: Callable[[], Forward] | None = None  # makes a generation's decode step, when not `forward` (the reference)
    precheck: Callable[[Any, str, str], None] | None = None  # (checkpoint, dtype, device): refusals before any work


def builtin(
    name: str, *, vectorized: bool = False, oracle: bool = True, progress: bool = False, attention: str | None = None
) -> Implementation:
    """The harness's own implementations: `scratch` (the notebook's forward) and `reference` (Hugging Face)."""
    if name == "scratch":
        from . import scratch

        forward = functools.partial(scratch.forward, vectorized=vectorized, progress=progress, attention=attention)
        how = "all heads at once" if vectorized else "one head at a time"
        how = "scaled_dot_product_attention (fused: no scores, no probs)" if attention == "sdpa" else how
        return Implementation("scratch", forward, {"attention": how})
    if name == "reference":
        from . import reference

        forward = functools.partial(reference.forward, oracle=oracle)
        return Implementation(
            "reference",
            forward,
            {"oracle": "float64 (layer by layer)" if oracle else "none"},
            functools.partial(reference.decoder, oracle=oracle),
        )
    raise HarnessError(
        f"unknown implementation {name!r}; choose scratch, reference, MODULE:ATTR or path/to/file.py:ATTR"
    )


def resolve(spec: str | Forward | Implementation, **options: Any) -> Implementation:
    """`scratch`, `reference`, `MODULE:ATTR` or `path/to/file.py:ATTR` (or, from Python, the forward or Adapter itself),
    checked against the contract before any work."""
    if isinstance(spec, Implementation):
        return spec
    if not isinstance(spec, str):
        name = getattr(spec, "__qualname__", None) or type(spec).__name__
        check_signature(name, spec)
        return Implementation(name, spec)
    if spec in ("scratch", "reference"):
        return builtin(spec, **options)
    if spec.startswith("dump:"):  # a port's dumped tensors, traced as an implementation (docs/ports.md)
        from .dump import dump_forward, is_dump_spec

        if is_dump_spec(spec):
            return Implementation(spec, *dump_forward(spec))
    if spec.startswith("llamacpp:") and not spec.removeprefix("llamacpp:").isidentifier():  # a GGUF (docs/ports.md)
        from .llamacpp import llamacpp_forward

        forward, metadata, precheck = llamacpp_forward(spec)
        return Implementation(spec, forward, metadata, precheck=precheck)
    if ":" not in spec:
        raise HarnessError(f"--impl {spec}: expected scratch, reference, MODULE:ATTR or path/to/file.py:ATTR")
    where, attr = spec.rsplit(":", 1)
    module = _load_file(spec, Path(where)) if where.endswith(".py") else _import(spec, where)
    if not hasattr(module, attr):
        raise HarnessError(f"--impl {spec}: {where} has no attribute {attr!r}")
    forward = getattr(module, attr)
    check_signature(spec, forward)
    return Implementation(spec, forward)


def check_signature(spec: str, forward: Any) -> None:
    """`forward(checkpoint, tokens, *, dtype, device)` must be a valid call."""
    if not callable(forward):
        raise HarnessError(
            f"--impl {spec}: {type(forward).__name__} object is not callable; expected "
            f"forward(checkpoint, tokens, *, dtype, device) or a harness.adapter.Adapter"
        )
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):
        return  # a builtin or C callable: its call will tell
    try:
        signature.bind(None, None, dtype=None, device=None)
    except TypeError as e:
        raise HarnessError(
            f"--impl {spec}: signature {signature} does not accept forward(checkpoint, tokens, *, dtype, device) ({e})"
        ) from None


def decoder(impl: Implementation) -> Forward:
    """The implementation's decode step, `forward(checkpoint, tokens, *, dtype, device, start_pos, cache)`, checked;
    made fresh for each generation, so that the state an Adapter or the reference keeps across steps (the module, the
    reference's caches) lives in it, not in the `cache` dict the contract hands the implementation."""
    from .adapter import Adapter

    if impl.decoder is not None:
        return impl.decoder()
    forward = impl.forward
    if isinstance(forward, Adapter):
        if forward.run_step is None:
            raise HarnessError(
                f"--impl {impl.name}: --generate needs the Adapter's run_step(module, tokens, start_pos, "
                f"cache), which calls the module on one step with its own KV cache (docs/generation.md)"
            )
        return forward.decoder()
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):
        return forward
    try:
        signature.bind(None, None, dtype=None, device=None, start_pos=0, cache={})
    except TypeError:
        raise HarnessError(
            f"--impl {impl.name}: --generate needs forward(checkpoint, tokens, *, dtype, device, start_pos, "
            f"cache) (docs/generation.md); its signature is {signature}"
        ) from None
    return forward


def _import(spec: str, module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise HarnessError(
                f"--impl {spec}: no module named {module_name!r} (installed, or on PYTHONPATH?)"
            ) from None
        raise HarnessError(f"--impl {spec}: importing {module_name} failed: {type(e).__name__}: {e}") from e
    except Exception as e:
        raise HarnessError(f"--impl {spec}: importing {module_name} failed: {type(e).__name__}: {e}") from e


def _load_file(spec: str, path: Path):
    """A Python file as a module of its own (named after its path, so two files of one name do not clash); its folder
    is on sys.path while it loads, so it can import its neighbours."""
    if not path.is_file():
        raise HarnessError(f"--impl {spec}: file {path} not found")
    path = path.resolve()
    name = f"harness_impl_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    sys.path.insert(0, str(path.parent))
    write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ beside the user's file
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) else ""
        raise HarnessError(f"--impl {spec}: loading {path.name} failed{where}: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.parent))
        sys.dont_write_bytecode = write_bytecode
    return module
