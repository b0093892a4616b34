"""A verification harness for hand-written Llama-3: trace every intermediate to HDF5 and find where two forwards part.

Public recording API: `tracing`, `record` (a tensor, or the kept `Rows` of a long one), `step` (a generation step's
names), `load_trace`; `layer_input` for isolated mode; `Adapter` (harness.adapter) to trace an nn.Module; errors a user
can fix raise `HarnessError`.
"""

__version__ = "0.1.0"

from .errors import HarnessError
from .isolation import layer_input
from .recording import is_tracing, record, step, tracing
from .trace_file import Rows, Trace, load_trace

__all__ = [
    "HarnessError",
    "Rows",
    "Trace",
    "is_tracing",
    "layer_input",
    "load_trace",
    "record",
    "step",
    "tracing",
    "__version__",
]
