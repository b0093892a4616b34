"""The names table (harness/names.py): every canonical name's order, axes, shape and row-keeping policy read from
`PARTS`, one row per part; the expected values are the README's "Canonical names" table."""

from types import SimpleNamespace

import pytest

from harness import names

CONFIG = SimpleNamespace(n_layers=2, n_heads=3, dim=8, vocab_size=50, ffn_dim=12, head_dim=4)


def test_the_orders_are_read_from_the_table():
    assert names.HEAD_NAMES == ("q", "k", "v", "q_rotated", "k_rotated", "scores", "probs", "output")
    assert names.CACHE_NAMES == ("cache_k", "cache_v")
    assert names.head_parts(in_step=True) == (*names.HEAD_NAMES[:5], *names.CACHE_NAMES, *names.HEAD_NAMES[5:])
    assert names.head_parts(in_step=False) == names.HEAD_NAMES
    assert names.LAYER_NAMES[:2] == ("attention_norm", "heads") and names.LAYER_NAMES[-1] == "output"
    assert names.layer_parts() == tuple(p.name for p in names.PARTS if p.level == "layer")
    order = list(names.canonical_names(2, 3))
    assert order[:3] == ["tokens", "embeddings", "layers.0.attention_norm"] and order[-2:] == ["norm", "logits"]
    assert len(order) == 4 + 2 * (len(names.layer_parts()) + 3 * len(names.HEAD_NAMES))
    assert order == sorted(reversed(order), key=names.order_key)


def test_every_canonical_name_has_its_tables_axes_and_shape():
    """Outside generation K is T; `shape_of` sizes each axis from the config (T and K from the forward's tokens)."""
    T = 5
    expected = {"T": T, "dim": 8, "vocab": 50, "ffn_dim": 12, "head_dim": 4}
    for name in names.canonical_names(CONFIG.n_layers, CONFIG.n_heads):
        part = names.part(name)
        axes = tuple("T" if a == "K" else a for a in part.axes)
        assert names.axes(name) == axes, name
        assert names.shape_of(name, CONFIG, T) == tuple(expected[a] for a in axes), name
    assert names.shape_of("layers.0.attention.heads.2.output", CONFIG, T) == (T, 4)
    assert names.shape_of("layers.0.output", CONFIG, T) == (T, 8)  # a layer's output, not a head's


def test_a_generation_steps_shapes_attend_over_every_position():
    """Decode step s: T = 1 new token, K = start_pos + 1 positions attended (the cache's, the step's appended)."""
    P = 7
    start_pos, T = names.step_span(P, 2)
    assert (start_pos, T) == (P + 1, 1) and names.step_span(P, 0) == (0, P)
    head = "steps.2.layers.1.attention.heads.0"
    assert names.axes(f"{head}.scores") == ("T", "K")
    assert names.shape_of(f"{head}.scores", CONFIG, T, start_pos) == (1, P + 2)
    assert names.shape_of(f"{head}.cache_v", CONFIG, T, start_pos) == (P + 2, 4)
    assert names.shape_of(f"{head}.q", CONFIG, T, start_pos) == (1, 4)


@pytest.mark.parametrize(
    "name", ["layers.2.output", "layers.0.attention.heads.3.q", "whatever", "_oracle.norm", "layers.0.made_up"]
)
def test_names_the_model_does_not_have_have_no_shape(name):
    assert names.shape_of(name, CONFIG, 5) is None


def test_extras_carry_no_axes_and_sort_after_the_names():
    assert names.axes("_oracle.layers.0.output") is None and names.part("_generated") is None
    assert names.is_extra("_oracle.norm") and not names.is_extra("_generated") and not names.is_extra("norm")
    assert names.order_key("steps.0.logits") < names.order_key("steps.1.embeddings")
    assert names.order_key("layers.0.made_up") > names.order_key("layers.0.output")


def test_which_rows_a_long_tensor_keeps_is_the_tables():
    """scores, probs and logits keep sampled rows past their bounds; everything else every row, whatever its size."""
    assert {p.name for p in names.PARTS if p.keeps_sampled_rows} == {"scores", "probs", "logits"}
    long, square = names.FULL_SQUARE_MAX_T + 1, names.FULL_SQUARE_MAX_T
    for name in ("layers.0.attention.heads.0.scores", "steps.0.layers.1.attention.heads.2.probs", "scores"):
        assert not names.keeps_every_row(name, (long, long)) and names.keeps_every_row(name, (square, square))
        assert not names.keeps_every_row("_oracle." + name, (long, long)), "an extra keeps what its name keeps"
    assert names.keeps_every_row("layers.0.attention.heads.0.q", (long, long))
    assert names.keeps_every_row("layers.0.output", (100_000, 8))
    vocab = names.FULL_LOGITS_MAX_ELEMENTS // 100 + 1
    assert not names.keeps_every_row("logits", (100, vocab)) and not names.keeps_every_row(
        "_oracle.logits", (100, vocab)
    )
    assert names.keeps_every_row("logits", (names.SAMPLED_ROWS, vocab * 2)), "no fewer rows than are sampled"
    assert names.keeps_every_row("logits", (100, vocab - 2))


def test_the_bounds_are_read_when_asked(monkeypatch):
    monkeypatch.setattr(names, "FULL_LOGITS_MAX_ELEMENTS", 1 << 10)
    assert not names.keeps_every_row("logits", (100, 50))


def test_names_and_paths():
    assert names.parse("steps.2.layers.3.attention.heads.1.probs") == (3, 1, "probs")
    assert names.parse("layers.3.feed_forward.gate") == (3, None, "feed_forward.gate")
    assert names.split_step("steps.10.norm") == (10, "norm") and names.split_step("norm") == (None, "norm")
    path = names.to_path("layers.0.attention.heads.3.q")
    assert path == "/layers/0/attention/heads/3/q" and names.from_path(path) == "layers.0.attention.heads.3.q"
