"""harness/adapter.py and harness/taps.py: the layout transforms, taps, the Llama tap table, errors naming the tap, the
module path and the layer, and an `Adapter`'s hooks living for one run only. A toy module (below) reproduces what
public libraries do that a tap must follow: one RoPE module shared by every layer, called for q then k; a norm called
twice per layer with keyword inputs only; a fused q/k/v Linear; the embedding called again for the logits; a
preallocated KV cache handed whole to attention. The Hugging Face reference (harness/reference.py) is the Adapter the
last tests drive."""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch

import harness
from harness import isolation, names, reference
from harness.adapter import (
    Adapter,
    attended,
    drop_batch,
    heads_first,
    input_of,
    interleave_halves,
    kv_to_query_heads,
    llama_taps,
    output_of,
    split_heads,
    split_qkv,
    submodule,
)
from harness.checkpoint import open_checkpoint
from harness.errors import HarnessError
from harness.hf_layout import permute_to_hf
from harness.verify import verify
from tests.helpers import assert_expected

# The config fields the transforms read: 2 query heads (head_dim 4, two rotation pairs each) over 1 KV head
CONFIG = SimpleNamespace(n_layers=1, n_heads=2, n_kv_heads=1, n_rep=2, head_dim=4)
T = 3


# ---- the layout transforms ------------------------------------------------------------------------------------------


def test_drop_batch_takes_the_one_sequence_and_refuses_a_batch():
    x = torch.arange(2 * T * 8.0).view(2, T, 8)
    assert_expected(drop_batch(x[:1], CONFIG), x[0])
    with pytest.raises(HarnessError, match=r"adapter: drop_batch expects a batch of 1, got shape \[2, 3, 8\]"):
        drop_batch(x, CONFIG)


@pytest.mark.parametrize("count, n", [("n_heads", 2), ("n_kv_heads", 1)])
def test_split_heads_is_a_view_per_head(count, n):
    x = torch.arange(T * n * 4.0).view(T, n * 4)  # [T, n * hd]
    split = split_heads(count)
    assert split.__name__ == f"split_heads({count!r})"
    heads = split(x, CONFIG)  # [n, T, hd]
    assert heads.shape == (n, T, 4)
    for h in range(n):
        assert_expected(heads[h], x[:, 4 * h : 4 * (h + 1)], what=f"head {h}")


def test_heads_first_swaps_tokens_and_heads():
    x = torch.arange(T * 2 * 4.0).view(T, 2, 4)  # [T, H, hd]
    assert_expected(heads_first(x, CONFIG), x.permute(1, 0, 2))


def test_interleave_halves_undoes_the_rotate_half_permutation():
    """q projected with HF's permuted rows (harness/hf_layout.py), split per head, comes back as Meta's q exactly."""
    x = torch.randn(T, 8, dtype=torch.float64)  # [T, dim]
    wq = torch.eye(8, dtype=torch.float64)  # Meta's rows; the identity keeps every value exact
    meta = split_heads()(x @ wq.T, CONFIG)  # [H, T, hd]
    hf = split_heads()(x @ permute_to_hf(wq, CONFIG.n_heads).T, CONFIG)
    assert not torch.equal(hf, meta)
    assert_expected(interleave_halves(hf, CONFIG), meta)


def test_kv_to_query_heads_gives_each_query_head_its_kv_head():
    config = SimpleNamespace(n_heads=6, n_kv_heads=2, n_rep=3)
    kv = torch.arange(2 * T * 4.0).view(2, T, 4)  # [KV, T, hd]
    heads = kv_to_query_heads(kv, config)  # [H, T, hd]
    assert heads.shape == (6, T, 4)
    for h in range(6):
        assert_expected(heads[h], kv[h // 3], what=f"query head {h}")


def test_split_qkv_splits_a_fused_projection_by_head_counts():
    """A fused q/k/v Linear's output splits by (n_heads * hd, n_kv_heads * hd, n_kv_heads * hd) on the last axis."""
    x = torch.arange(T * 16.0).view(T, 16)  # [T, (2 + 2 * 1) * 4]
    assert_expected(split_qkv("q")(x, CONFIG), x[:, :8])
    assert_expected(split_qkv("k")(x, CONFIG), x[:, 8:12])
    assert_expected(split_qkv("v")(x, CONFIG), x[:, 12:])
    assert split_qkv("k").__name__ == "split_qkv('k')"
    with pytest.raises(HarnessError, match=r"split_qkv\('q'\): a fused q/k/v of .* = 16 values .* got shape \[3, 12\]"):
        split_qkv("q")(x[:, :12], CONFIG)


def test_attended_cuts_a_preallocated_cache_to_the_steps_positions():
    cache = torch.arange(2 * 16 * 4.0).view(2, 16, 4)  # [KV, max_seq_len, hd]
    assert_expected(attended()(cache, CONFIG, start_pos=3, T=2), cache[:, :5])
    assert_expected(attended(axis=0)(cache[0], CONFIG, start_pos=0, T=7), cache[0, :7])


def test_a_transform_gets_the_steps_start_pos_and_t_when_it_takes_them():
    """Read off its signature once, when the tap is made: `f(x, config)` as before, keywords by name or **kwargs."""

    def at_start(x, config, *, start_pos):
        return x + start_pos

    def anything(x, config, **step):
        return x * step["T"]

    tap = output_of("m", drop_batch, at_start, anything, lambda x, config: -x)
    assert tap.step_arguments == ((), ("start_pos",), ("start_pos", "T"), ())
    x = torch.ones(1, T, 2)
    assert_expected(tap.value((), x, CONFIG, step={"start_pos": 4, "T": 3}), -torch.full((T, 2), 15.0))
    with pytest.raises(HarnessError, match=r"at_start takes start_pos: not known outside an Adapter's run"):
        tap.value((), x, CONFIG)
    assert dataclasses.replace(tap, transforms=(at_start,)).step_arguments == (("start_pos",),)


# ---- taps -----------------------------------------------------------------------------------------------------------


def test_a_tap_index_path_reaches_into_nested_tuples():
    """`index=(1, 0)`: the keys of a module returning (x, (keys, values)), as llms-from-scratch's KV-cache attention
    does; an int index still picks from a tuple and leaves a single tensor as it is."""
    x, keys, values = torch.zeros(2), torch.ones(2), torch.full((2,), 2.0)
    assert output_of("att", index=(1, 0)).value((), (x, (keys, values)), None).equal(keys)
    assert output_of("att", index=(1, 1)).value((), (x, (keys, values)), None).equal(values)
    assert output_of("att", index=1).value((), (x, keys), None).equal(keys)
    assert output_of("att", index=1).value((), x, None).equal(x)


def test_a_tap_applies_its_transforms_in_order_to_the_input_or_output():
    x = torch.arange(T * 8.0).view(1, T, 8)  # [1, T, H * hd]
    tap = input_of("layers.{layer}.attention.wo", drop_batch, split_heads("n_heads"), index=0)
    assert not tap.is_function and output_of("pkg.module:rotate").is_function
    assert_expected(tap.value((x,), None, CONFIG), x[0].view(T, 2, 4).transpose(0, 1))
    assert_expected(output_of("norm", drop_batch).value((x,), 2 * x, CONFIG), 2 * x[0])


def test_an_input_is_read_by_position_or_by_keyword_however_it_was_passed():
    """`index=0` or `index="x"`: a norm called as `norm(x=h)` (keyword only) or `norm(h)`, found either way through the
    called function's signature; an input passed neither way is refused, naming what the call had."""

    def norm(x, weight=None, *, eps=1e-5):
        return x

    x, w = torch.ones(2), torch.full((2,), 3.0)
    for args, kwargs in [((x, w), {}), ((), {"x": x, "weight": w}), ((x,), {"weight": w})]:
        for index in (0, "x"):
            assert input_of("m", index=index).value(args, None, None, keywords=kwargs, function=norm).equal(x)
        for index in (1, "weight"):
            assert input_of("m", index=index).value(args, None, None, keywords=kwargs, function=norm).equal(w)
    assert input_of("m", index="eps").value((x,), None, None, keywords={"eps": w}, function=norm).equal(w)
    with pytest.raises(
        HarnessError, match=r"input 1 not passed: called with 1 positional input\(s\) and keywords \[\]"
    ):
        input_of("m", index=1).value((x,), None, None, function=norm)
    with pytest.raises(HarnessError, match=r"input 'x' not passed: called with 0 .* keywords \['y'\]"):
        input_of("m", index="x").value((), None, None, keywords={"y": x}, function=torch.softmax)  # no signature
    with pytest.raises(HarnessError, match=r"index 'x' names a keyword input: only input_of reads keywords"):
        output_of("m", index="x").value((), (x,), None)
    with pytest.raises(HarnessError, match=r"index 2 out of range: the value holds 2 elements"):
        output_of("m", index=(0, 2)).value((), ((x, w),), None)


def test_llama_taps_map_every_module_name_and_leave_the_rest_to_function_taps():
    """Modules give every canonical name but the rotated q/k, scores and probs (function taps add those) and tokens
    and logits (the harness records them); Meta's module paths by default, q/k mapped back from HF's half split."""
    taps = llama_taps()
    by_module = {n for n in names.canonical_names(1, 1) if n not in ("tokens", "logits")}
    by_module -= {f"layers.0.attention.heads.0.{p}" for p in ("q_rotated", "k_rotated", "scores", "probs")}
    assert {name.format(layer=0, head=0) for name in taps} == by_module
    assert taps["layers.{layer}.attention.heads.{head}.q"].target == "layers.{layer}.attention.wq"
    assert interleave_halves not in taps["layers.{layer}.attention.heads.{head}.q"].transforms
    hf = llama_taps({"layers": "model.layers.{layer}", "wq": "self_attn.q_proj"}, half_split=True)
    q = hf["layers.{layer}.attention.heads.{head}.q"]
    assert q.target == "model.layers.{layer}.self_attn.q_proj" and q.transforms[-1] is interleave_halves
    assert hf["layers.{layer}.ffn_norm"].target == "model.layers.{layer}.ffn_norm"  # a key not given: Meta's name


def test_llama_taps_split_a_fused_qkv_projection():
    """`qkv`: one Linear projects q, k and v (its path inside a layer); q, k and v read it, split, then as before."""
    taps = llama_taps(half_split=True, qkv="attention.wqkv")
    transforms = {
        "q": ["drop_batch", "split_qkv('q')", "split_heads('n_heads')", "interleave_halves"],
        "k": ["drop_batch", "split_qkv('k')", "split_heads('n_kv_heads')", "kv_to_query_heads", "interleave_halves"],
        "v": ["drop_batch", "split_qkv('v')", "split_heads('n_kv_heads')", "kv_to_query_heads"],
    }
    for part, expected in transforms.items():
        tap = taps[f"layers.{{layer}}.attention.heads.{{head}}.{part}"]
        assert tap.target == "layers.{layer}.attention.wqkv"
        assert [t.__name__ for t in tap.transforms] == expected, part
    assert taps["layers.{layer}.attention.heads.{head}.output"].target == "layers.{layer}.attention.wo"


# ---- a toy of what public libraries do -------------------------------------------------------------------------------

D, HD = 8, 4  # dim, head_dim: 2 query heads over 1 KV head, as CONFIG, in 2 layers
TOY = SimpleNamespace(n_layers=2, n_heads=2, n_kv_heads=1, n_rep=2, head_dim=HD)
HEAD = "layers.{layer}.attention.heads.{head}"
TOKENS = torch.tensor([1, 2, 3])


class Scale(torch.nn.Module):
    """A norm's stand-in, called `norm(x=...)`: by keyword only."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(D))

    def forward(self, x):
        return x * self.weight


class Rope(torch.nn.Module):
    """A RoPE's stand-in that depends on the position: one module for every layer, called on q, then on k."""

    def forward(self, x):  # [1, T, n, hd]
        return x * torch.arange(1.0, x.shape[1] + 1)[:, None, None]


class Tied(torch.nn.Embedding):
    """The token embedding, called again (`unembed=True`) for the logits."""

    def forward(self, x, unembed=False):
        return x @ self.weight.T if unembed else super().forward(x)


class ToyLayer(torch.nn.Module):
    """One norm module called twice (before attention, before the absent MLP), the model's shared RoPE, q/k/v fused."""

    def __init__(self, rope: Rope):
        super().__init__()
        self.norm, self.rope = Scale(), rope
        self.wqkv = torch.nn.Linear(D, 4 * HD, bias=False)  # (2 + 1 + 1) heads of hd
        self.wo = torch.nn.Linear(2 * HD, D, bias=False)
        self.seen: dict[str, torch.Tensor] = {}  # what it computed, for the tests to compare the trace with

    def forward(self, x):  # [1, T, D]
        h = self.norm(x=x)
        q, k, v = self.wqkv(h).unflatten(-1, (4, HD)).split([2, 1, 1], dim=-2)  # [1, T, n, hd]
        q_rotated, k_rotated = self.rope(q), self.rope(k)
        x = x + self.wo((q_rotated * k_rotated + v).flatten(-2))  # not attention, but every value used
        self.seen.update(attention_norm=h, q=q, k=k, v=v, q_rotated=q_rotated, k_rotated=k_rotated, residual=x)
        return x + self.norm(x=x)


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.rope = Tied(16, D), Rope()
        self.layers = torch.nn.ModuleList([ToyLayer(self.rope) for _ in range(TOY.n_layers)])
        self.norm = Scale()

    def forward(self, tokens):  # [1, T] -> logits [1, T, 16]
        x = self.emb(tokens)
        for layer in self.layers:
            x = layer(x=x)
        return self.emb(self.norm(x=x), unembed=True)


def toy_taps(rope: str = "rope") -> dict:
    """The toy's table: q/k/v from `llama_taps`' fused split, the rest by hand (`rope`: the shared module's path)."""
    qkv = {n: tap for n, tap in llama_taps(qkv="wqkv").items() if n.startswith(HEAD) and n[-2:] in (".q", ".k", ".v")}
    return qkv | {
        "embeddings": output_of("emb", drop_batch),  # call 0 of the run: not the second, the logits'
        "layers.{layer}.attention_norm": output_of("layers.{layer}.norm", drop_batch, call=0),
        "layers.{layer}.attention_residual": input_of("layers.{layer}.norm", drop_batch, index="x", call=1),
        f"{HEAD}.q_rotated": output_of(rope, drop_batch, heads_first, call=0),
        f"{HEAD}.k_rotated": output_of(rope, drop_batch, heads_first, kv_to_query_heads, call=1),
        "layers.{layer}.output": output_of("layers.{layer}", drop_batch),
        "norm": output_of("norm", drop_batch),
    }


def toy_adapter(model: torch.nn.Module, taps: dict, **kwargs) -> Adapter:
    return Adapter(build=lambda c, d, dev: model, taps=taps, layers="layers.{layer}", final_norm="norm", **kwargs)


def trace_toy(model: Toy, taps: dict, path):
    with harness.tracing(path):
        toy_adapter(model, taps)(SimpleNamespace(config=TOY), TOKENS, dtype=torch.float32, device="cpu")
    assert not [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks], "hooks left after the run"
    return harness.load_trace(path)


@pytest.mark.parametrize("rope", ["rope", "layers.{layer}.rope"])
def test_a_rope_module_shared_by_every_layer_is_counted_per_layer(tmp_path, rope):
    """One module, reached from the root or from each layer: q_rotated is its call 0 in each layer, k_rotated its call
    1, each named after the layer running (not layer 0's values under layers 1 and 2, nor a call=N ignored)."""
    model = Toy()
    trace = trace_toy(model, toy_taps(rope), tmp_path / "t.h5")
    assert not torch.equal(model.layers[0].seen["q_rotated"], model.layers[1].seen["q_rotated"])
    for layer, seen in enumerate(block.seen for block in model.layers):
        for head in range(TOY.n_heads):
            name = HEAD.format(layer=layer, head=head)
            assert_expected(trace[f"{name}.q_rotated"], seen["q_rotated"][0, :, head], what=f"{name}.q_rotated")
            assert_expected(trace[f"{name}.k_rotated"], seen["k_rotated"][0, :, 0], what=f"{name}.k_rotated")


def test_a_module_called_twice_per_layer_with_keyword_inputs_only(tmp_path):
    """`norm(x=...)` before attention (call 0) and after it (call 1), and the final norm and each layer called by
    keyword: read by `index="x"` and by position 0 alike."""
    model = Toy()
    trace = trace_toy(model, toy_taps(), tmp_path / "t.h5")
    for layer, seen in enumerate(block.seen for block in model.layers):
        assert_expected(trace[f"layers.{layer}.attention_norm"], seen["attention_norm"][0], what=f"layer {layer}")
        assert_expected(trace[f"layers.{layer}.attention_residual"], seen["residual"][0], what=f"layer {layer}")
    final = model.norm(x=trace["layers.1.output"])
    assert_expected(trace["norm"], final)


def test_the_embedding_called_again_for_the_logits_is_read_at_its_first_call(tmp_path):
    """A name without a `{layer}` slot counts calls in the whole run: `embeddings` is the lookup (call 0), not the
    logits computed by the same module (call 1), and nothing is recorded twice."""
    model = Toy()
    trace = trace_toy(model, toy_taps(), tmp_path / "t.h5")
    assert_expected(trace["embeddings"], model.emb.weight[TOKENS])


def test_a_fused_qkv_projection_gives_q_k_and_v(tmp_path):
    model = Toy()
    trace = trace_toy(model, toy_taps(), tmp_path / "t.h5")
    for layer, seen in enumerate(block.seen for block in model.layers):
        for head in range(TOY.n_heads):
            name = HEAD.format(layer=layer, head=head)
            assert_expected(trace[f"{name}.q"], seen["q"][0, :, head], what=f"{name}.q")
            assert_expected(trace[f"{name}.k"], seen["k"][0, :, 0], what=f"{name}.k")
            assert_expected(trace[f"{name}.v"], seen["v"][0, :, 0], what=f"{name}.v")


def test_isolated_mode_replaces_a_keyword_input(tmp_path):
    """The layer pre-hook hands `layer(x=...)` and `norm(x=...)` the reference's input, as it does a positional one."""
    model = Toy()
    with isolation.isolated(lambda layer: torch.zeros(len(TOKENS), D), TOY.n_layers, "toy"):
        trace = trace_toy(model, toy_taps(), tmp_path / "t.h5")
    assert_expected(trace["layers.1.attention_norm"], torch.zeros(len(TOKENS), D))
    assert_expected(trace["norm"], torch.zeros(len(TOKENS), D))


class CachedLayer(torch.nn.Module):
    """Keeps a preallocated cache [1, 16, KV, hd] and hands `keys` all of it, as some libraries hand attention."""

    def __init__(self):
        super().__init__()
        self.wk, self.keys = torch.nn.Linear(D, HD, bias=False), torch.nn.Identity()
        self.register_buffer("cache_k", torch.zeros(1, 16, 1, HD))

    def forward(self, x, start_pos):  # [1, T, D]
        self.cache_k[:, start_pos : start_pos + x.shape[1]] = self.wk(x).unflatten(-1, (1, HD))
        keys = self.keys(self.cache_k)[:, : start_pos + x.shape[1]]  # [1, K, KV, hd]: the positions attended
        return x + keys.sum((1, 3))[:, None]


class Cached(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.norm = torch.nn.Embedding(16, D), torch.nn.Identity()
        self.layers = torch.nn.ModuleList([CachedLayer() for _ in range(TOY.n_layers)])

    def forward(self, tokens, start_pos):  # [1, T]
        x = self.emb(tokens)
        for layer in self.layers:
            x = layer(x, start_pos)
        return self.norm(x)


def test_a_step_aware_transform_cuts_a_preallocated_cache(tmp_path):
    """`attended()` takes the step's start_pos and T: each step's cache_k holds the positions that step attends."""
    model = Cached()
    cache_k = output_of("layers.{layer}.keys", drop_batch, heads_first, attended(), kv_to_query_heads)
    adapter = toy_adapter(
        model,
        {},
        cache_taps={f"{HEAD}.cache_k": cache_k},
        run_step=lambda m, tokens, start_pos, cache: m(tokens[None], start_pos),
    )
    decode = adapter.decoder()
    with harness.tracing(tmp_path / "t.h5"):
        for step, (tokens, start_pos) in enumerate([(TOKENS, 0), (torch.tensor([4]), 3)]):
            with harness.step(step):
                decode(
                    SimpleNamespace(config=TOY),
                    tokens,
                    dtype=torch.float32,
                    device="cpu",
                    start_pos=start_pos,
                    cache={},
                )
    trace = harness.load_trace(tmp_path / "t.h5")
    for step, positions in [(0, 3), (1, 4)]:
        for layer, head in [(0, 0), (1, 1)]:
            name = f"steps.{step}.{HEAD.format(layer=layer, head=head)}.cache_k"
            assert_expected(trace[name], model.layers[layer].cache_k[0, :positions, 0], what=name)


# ---- errors name the tap, the module path and the layer -------------------------------------------------------------


def test_a_missing_submodule_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert submodule(model, "0") is model[0] and submodule(model, "") is model
    with pytest.raises(HarnessError, match=r"adapter: the module has no submodule 'layers.3' \(see print\(model\)"):
        submodule(model, "layers.3")


@pytest.mark.parametrize(
    "taps, message",
    [
        (
            {"layers.{layer}.ffn_norm": output_of("layers.{layer}.ffn_norm")},
            "adapter: tap layers.0.ffn_norm (module 'layers.0.ffn_norm', layer 0): the module has no submodule "
            "'layers.0.ffn_norm' (see print(model) for its paths)",
        ),
        (
            {"norm": output_of("no_such_module_xyz:f")},
            "adapter: tap norm (function 'no_such_module_xyz:f'): cannot import 'no_such_module_xyz' (No module named",
        ),
        (
            {"norm": output_of("torch:no_such_function")},
            "adapter: tap norm (function 'torch:no_such_function'): torch has no function 'no_such_function'",
        ),
    ],
)
def test_a_tap_that_cannot_be_attached_is_named(taps, message):
    with pytest.raises(HarnessError, match=re.escape(message)):
        with toy_adapter(Toy(), taps).attached(Toy(), TOY):
            pass


@pytest.mark.parametrize(
    "taps, message",
    [
        (  # a per-head name needs [H, ...]: wo's output is [T, D]
            {f"{HEAD}.q": output_of("layers.{layer}.wo", drop_batch)},
            "adapter: tap layers.0.attention.heads.{head}.q (module 'layers.0.wo', layer 0, call 0): should give one "
            "entry per query head (2), got shape [3, 8]",
        ),
        (  # was IndexError: tuple index out of range
            {"layers.{layer}.attention_norm": input_of("layers.{layer}.norm", index=1)},
            "adapter: tap layers.0.attention_norm (module 'layers.0.norm', layer 0, call 0): input 1 not passed: "
            "called with 0 positional input(s) and keywords ['x']",
        ),
        (  # a per-layer module read for a name without {layer}
            {"norm": output_of("layers.{layer}.norm", drop_batch)},
            "adapter: tap norm (module 'layers.1.norm', layer 1, call 0): trace: name 'norm' recorded twice",
        ),
        (
            {"layers.{layer}.attention_norm": output_of("emb", drop_batch)},
            "adapter: tap layers.{layer}.attention_norm (module 'emb', before the decoder layers, call 0): called "
            "outside the decoder layers",
        ),
        (
            {"layers.{layer}.attention_norm": output_of("norm", drop_batch)},
            "adapter: tap layers.2.attention_norm (module 'norm', after the decoder layers, call 0): called outside",
        ),
    ],
)
def test_a_tap_that_fails_in_a_call_names_itself_its_module_and_the_layer(tmp_path, taps, message):
    model = Toy()
    with pytest.raises(HarnessError, match=re.escape(message)):
        trace_toy(model, taps, tmp_path / "t.h5")
    assert not [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks], "hooks left after the error"


# ---- the Hugging Face reference as an Adapter -----------------------------------------------------------------------


def test_adapter_hooks_live_only_for_the_run(tiny_checkpoint, tmp_path):
    """One run records every canonical name but tokens and logits (the harness's), in forward order; afterwards no hook
    is left on any module and no tapped function is left wrapped."""
    ckpt = open_checkpoint(tiny_checkpoint("3.0"))
    model = reference.build_model(ckpt, torch.float32)
    adapter = dataclasses.replace(reference.HUGGING_FACE, build=lambda c, d, dev: model)
    with harness.tracing(tmp_path / "t.h5"):
        logits = adapter(ckpt, torch.tensor([1, 2, 3]), dtype=torch.float32, device="cpu")
    assert logits.shape == (3, ckpt.config.vocab_size)
    hooked = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooked and reference.attention_scores.__name__ == "attention_scores"
    c = ckpt.config
    recorded = [n for n in names.canonical_names(c.n_layers, c.n_heads) if n not in ("tokens", "logits")]
    assert harness.load_trace(tmp_path / "t.h5").names == recorded


@pytest.mark.slow
def test_the_hugging_face_adapter_as_a_users_module(tiny_checkpoint, tmp_path):
    """An Adapter is an implementation like any other: HF's own, named as MODULE:ATTR, passes end to end and isolated
    (its layers' inputs replaced by a forward pre-hook), every name but tokens compared."""
    c = open_checkpoint(tiny_checkpoint("3.2")).config
    compared = [n for n in names.canonical_names(c.n_layers, c.n_heads) if n != "tokens"]
    for isolated in (False, True):
        result = verify(
            tiny_checkpoint("3.2"),
            out=tmp_path / f"v{isolated}",
            dtype="bfloat16",
            isolated=isolated,
            impl="harness.reference:HUGGING_FACE",
        )
        assert result.passed, result.comparison.first_divergence
        assert sorted(r.name for r in result.comparison.results) == sorted(compared)


@pytest.mark.slow
def test_a_wrong_adapter_fails_at_q(tiny_checkpoint, tmp_path, monkeypatch):
    """Hugging Face's q rows left in their half-split order (the adapter forgets `interleave_halves`): caught at `q`."""
    taps = dict(reference.HF_TAPS)
    q = taps["layers.{layer}.attention.heads.{head}.q"]
    taps["layers.{layer}.attention.heads.{head}.q"] = dataclasses.replace(q, transforms=q.transforms[:-1])
    monkeypatch.setattr(reference, "WRONG", dataclasses.replace(reference.HUGGING_FACE, taps=taps), raising=False)
    result = verify(tiny_checkpoint("3.0"), out=tmp_path / "v", dtype="float32", impl="harness.reference:WRONG")
    assert result.comparison.first_divergence == "layers.0.attention.heads.0.q"
