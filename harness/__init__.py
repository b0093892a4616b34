"""A verification harness for hand-written Llama-3: trace every intermediate to HDF5 and find where two forwards part.

Public recording API: `tracing`, `record` (a tensor, or the kept `Rows` of a long one), `step` (a generation step's
names), `load_trace`; `prompt_tokens` (a prompt's token ids for a checkpoint); `layer_input` for isolated mode and
`skip_layer` for a `--layers` range; `Adapter` (harness.adapter) to trace an nn.Module; errors a user can fix raise
`HarnessError`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Each public name is imported on first use (PEP 562), so that importing the package alone, as pytest does in every
# project to load the plugin (harness.pytest_plugin), imports no torch.
_PUBLIC = {
    "HarnessError": "errors",
    "layer_input": "isolation",
    "skip_layer": "isolation",
    "is_tracing": "recording",
    "record": "recording",
    "step": "recording",
    "tracing": "recording",
    "Rows": "trace_file",
    "Trace": "trace_file",
    "load_trace": "trace_file",
    "prompt_tokens": "run",
}
if TYPE_CHECKING:
    from .errors import HarnessError
    from .isolation import layer_input, skip_layer
    from .recording import is_tracing, record, step, tracing
    from .run import prompt_tokens
    from .trace_file import Rows, Trace, load_trace


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # looked up once: `harness.record` in a forward's loop is a plain attribute after
    return value


__all__ = [
    "HarnessError",
    "Rows",
    "Trace",
    "is_tracing",
    "layer_input",
    "load_trace",
    "prompt_tokens",
    "record",
    "skip_layer",
    "step",
    "tracing",
    "__version__",
]
