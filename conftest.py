"""Fixtures shared by tests/ and examples/tests/: tiny checkpoints made once per test session (per xdist worker),
never downloaded. The suite's options and fixtures come from the pytest plugin (harness/pytest_plugin.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.tiny import make_tiny

VARIANTS = ("3.0", "3.1", "3.2")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(variant="3.0", fmt="meta", seed=0)` -> directory of a tiny checkpoint, made once and reused."""
    made: dict[tuple, Path] = {}

    def get(variant: str = "3.0", fmt: str = "meta", seed: int = 0) -> Path:
        key = (variant, fmt, seed)
        if key not in made:
            out = tmp_path_factory.mktemp(f"tiny-{variant}-{fmt}-{seed}") / "ckpt"
            make_tiny(out, seed=seed, variant=variant, fmt=fmt)
            made[key] = out
        return made[key]

    return get
