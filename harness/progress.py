"""Progress on a terminal: one bar per phase of a long run (the reference with its oracle, the implementation, the
comparison), on stderr and only when stderr is a terminal; transformers' own "Loading weights" bar kept quiet.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


def wanted(stream: TextIO | None = None) -> bool:
    """Whether to draw bars on `stream` (stderr by default): only on a terminal, never into a pipe or a log file."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextmanager
def phase(desc: str, *, enabled: bool, stream: TextIO | None = None) -> Iterator[None]:
    """A bar showing `desc` and the time spent in it while the block runs, cleared when it ends. Nothing when not
    `enabled`. The phases have no steps to count, so a thread redraws the elapsed time twice a second."""
    if not enabled:
        yield
        return
    from tqdm import tqdm

    bar = tqdm(desc=desc, bar_format="{desc}: {elapsed}", file=sys.stderr if stream is None else stream, leave=False)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        bar.close()


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars off inside the block (its "Loading weights" bar, drawn even into a log file), put
    back as they were after it."""
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()
