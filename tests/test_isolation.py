"""Isolated mode (harness/isolation.py): `layer_input` is the identity outside it; inside, each layer gets the
reference's input in its own shape, dtype and device, and a layer that never asked is reported by number."""

import contextvars

import pytest
import torch

from harness import layer_input
from harness.errors import HarnessError
from harness.isolation import isolated
from tests.helpers import assert_expected


def reference_input(layer: int) -> torch.Tensor:
    return torch.full((3, 4), float(layer), dtype=torch.float64)  # [T, D]: layer l's input holds l


def test_outside_isolated_mode_it_returns_x_itself():
    x = torch.randn(3, 4)
    assert layer_input(0, x) is x


def test_each_layer_gets_the_references_input_in_its_shape_and_dtype():
    with isolated(reference_input, n_layers=1, implementation="mine"):
        batched = layer_input(0, torch.zeros(1, 3, 4, dtype=torch.bfloat16))  # a leading batch of 1 is fine
        final = layer_input(1, torch.zeros(3, 4))
    assert batched.shape == (1, 3, 4) and batched.dtype == torch.bfloat16
    assert_expected(final, torch.ones(3, 4), what="the final norm's input")
    x = torch.zeros(3, 4)
    assert layer_input(0, x) is x, "the block ended: isolated mode is off again"


def test_a_layer_of_another_size_is_refused():
    with pytest.raises(HarnessError, match=r"layer 0's input has shape \[2, 4\], the reference's \[3, 4\]"):
        with isolated(reference_input, n_layers=1, implementation="mine"):
            layer_input(0, torch.zeros(2, 4))


def test_layers_never_passed_through_are_named():
    with pytest.raises(HarnessError, match=r"mine: isolated mode, .* never called for layer\(s\) 1, final norm"):
        with isolated(reference_input, n_layers=2, implementation="mine"):
            layer_input(0, torch.zeros(3, 4))


def test_many_missing_layers_are_counted():
    with pytest.raises(HarnessError, match=r"layer\(s\) 0, 1, 2, 3, 4, 5, 6, 7 and 3 more"):
        with isolated(reference_input, n_layers=10, implementation="mine"):
            pass


def test_isolated_mode_ends_with_a_failing_block_and_is_scoped_to_its_context():
    x = torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="boom"):
        with isolated(reference_input, n_layers=1, implementation="mine"):
            assert contextvars.Context().run(layer_input, 0, x) is x, "a fresh context is not isolated"
            raise RuntimeError("boom")
    assert layer_input(0, x) is x
