"""Isolated mode (harness/isolation.py): `layer_input` is the identity outside it; inside, each layer gets the
reference's input in its own shape, dtype and device, and a layer that never asked is reported by number. Layer ranges
(`--layers A:B`): the forward ends past the range, and an isolated range's other layers may be skipped."""

import contextvars

import pytest
import torch

from harness import layer_input
from harness.errors import HarnessError
from harness.isolation import LayerRange, RangeEnd, isolated, layers_judged, skip_layer
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


# ---- layer ranges (`--layers A:B`) -------------------------------------------------------------------------------


def test_a_range_ends_the_forward_at_the_first_layer_past_it():
    """layers_judged(1:3 of 4): layer 3 (and the final norm) raise RangeEnd; the range and the layers before it pass
    x through when the run is not isolated; a range reaching the end lets the final norm through."""
    x = torch.zeros(3, 4)
    with layers_judged(LayerRange(1, 3, 4)):
        assert all(layer_input(layer, x) is x for layer in range(3))
        for past in (3, 4):
            with pytest.raises(RangeEnd):
                layer_input(past, x)
        assert not any(skip_layer(layer) for layer in range(5)), "nothing is skipped outside isolated mode"
    with layers_judged(LayerRange(2, 4, 4)):
        assert layer_input(4, x) is x
    assert layer_input(3, x) is x, "the block ended: no range"


def test_an_isolated_range_skips_the_layers_outside_it_and_feeds_those_inside():
    """Isolated, 1:3 of 4: layers 0 and 3 (and the final norm) may be skipped; 1 and 2 get the reference's input, and
    only they must ask for it; layer 0's x passes through unchanged (an implementation that does not skip)."""
    x = torch.zeros(3, 4)
    with layers_judged(LayerRange(1, 3, 4)), isolated(reference_input, n_layers=4, implementation="mine"):
        assert [skip_layer(layer) for layer in range(5)] == [True, False, False, True, True]
        assert layer_input(0, x) is x
        assert_expected(layer_input(1, x), torch.ones(3, 4))
        assert_expected(layer_input(2, x), torch.full((3, 4), 2.0))
    with pytest.raises(HarnessError, match=r"never called for layer\(s\) 2: "):
        with layers_judged(LayerRange(1, 3, 4)), isolated(reference_input, n_layers=4, implementation="mine"):
            layer_input(1, x)


def test_range_end_is_not_an_exception_an_implementation_would_swallow():
    assert issubclass(RangeEnd, BaseException) and not issubclass(RangeEnd, Exception)
    assert LayerRange(0, 2, 2).patterns() == ["layers.0.*", "layers.1.*", "embeddings", "norm", "logits"]
    assert LayerRange(1, 2, 3).patterns() == ["layers.1.*"] and str(LayerRange(1, 2, 3)) == "1:2"
