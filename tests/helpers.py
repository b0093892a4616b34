"""What the tests share: one assert helper over torch.testing.assert_close, so a failure names what was compared."""

from __future__ import annotations

import torch


def assert_expected(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float = 0.0, atol: float = 0.0, what: str = ""
) -> None:
    """`actual` equals `expected` within rtol/atol (exactly by default); the message names `what` and both shapes."""
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol, check_dtype=False, msg=lambda m: f"{what}: {m}" if what else m
    )
