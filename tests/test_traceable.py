"""Constructs that only some inductor versions lower stay out of traced code.

Two such constructs met the first real GPU (an H200, torch 2.11, 2026-12-04) and failed the compile
there while every CPU test on torch 2.14 passed:
- a bit-cast view of a bool tensor (`(x >= t).view(torch.uint8)` in solarize): inductor 2.11 cannot
  lower `aten.view.dtype` of a bool ("torch.bool is not supported by torch.iinfo");
- `arange(...) * 0x9E3779B9` in the keyed hash: inductor folds it into an index expression that its
  Triton code evaluates in int32 ("Scalar 2654435769 is out of range for type int32"), which only a
  GPU compile shows.
The checks below look for the constructs themselves, so they fail on any torch version.
"""

import re

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

from fastcifar import keyed_random as kr
from fastcifar import mixing
from fastcifar.augment import TrainAugment, train_key
from fastcifar.config import AugmentConfig

INT32_MAX = 2**31 - 1


def aten_graphs(fn, *args) -> list[torch.fx.GraphModule]:
    """The ATen-level forward graphs torch.compile(fn, fullgraph=True) hands to inductor."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=aot_autograd(fw_compiler=keep))
    compiled(*args)
    return graphs


def bool_bitcasts(graph: torch.fx.GraphModule) -> list[str]:
    """`aten.view.dtype` nodes that reinterpret a bool tensor's bytes, or make a bool tensor."""
    found = []
    for node in graph.graph.nodes:
        if node.target is torch.ops.aten.view.dtype:
            source = node.args[0].meta["val"].dtype
            if torch.bool in (source, node.args[1]):
                found.append(f"{node.name}: {source} -> {node.args[1]}")
    return found


def wide_arange_products(graph: torch.fx.GraphModule) -> list[str]:
    """`arange(...) * c` with an integer c outside int32: inductor turns such a product into an
    index expression, which its Triton code evaluates in int32."""
    found = []
    for node in graph.graph.nodes:
        if node.target in (torch.ops.aten.mul.Tensor, torch.ops.aten.mul.Scalar):
            ranged = any(isinstance(a, torch.fx.Node) and a.target in _ARANGES for a in node.args)
            wide = [a for a in node.args if isinstance(a, int) and abs(a) > INT32_MAX]
            if ranged and wide:
                found.append(f"{node.name}: arange * {wide[0]}")
    return found


_ARANGES = (torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step)


@pytest.mark.compiled
@pytest.mark.parametrize("erasing", ["zero", "random"])
def test_the_augmentation_has_no_construct_inductor_2_11_cannot_lower(erasing):
    """Every RandAugment op, crop, flip and erasing, traced as the step traces them (graph_safe):
    no bool bit-cast, and no wide constant times an arange (the keyed hash's counters come in
    made beforehand, TrainAugment.counters)."""
    cfg = AugmentConfig(erasing_value=erasing)
    plan = TrainAugment(cfg, 32, 32, torch.device("cpu"), graph_safe=True)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    key = torch.tensor(train_key(0, 3))
    graphs = aten_graphs(plan.__call__, images, torch.arange(8), key, plan.noise(0, 3, torch.device("cpu")))
    assert graphs and sum(len(g.graph.nodes) for g in graphs) > 100  # the whole pipeline was traced
    assert [hit for g in graphs for hit in bool_bitcasts(g)] == []
    assert [hit for g in graphs for hit in wide_arange_products(g)] == []


@pytest.mark.compiled
def test_the_graph_checks_find_what_they_look_for():
    """The checks above are not vacuous: the old solarize's bit-cast and the old hash's counters."""
    graphs = aten_graphs(lambda x: x ^ (x >= 128).view(torch.uint8).mul(255), torch.arange(256, dtype=torch.uint8))
    assert len(bool_bitcasts(graphs[0])) == 1
    graphs = aten_graphs(lambda i: i.unsqueeze(-1) + torch.arange(1, 4) * 0x9E3779B9, torch.arange(5))
    assert wide_arange_products(graphs[0]) != []


def wide_index_constants(code: str) -> list[str]:
    """Terms of generated code that multiply or offset a loop index (x0, x1, ...) by an integer
    outside int32: inductor's Triton kernels evaluate index expressions in int32 when the sizes allow."""
    hits = re.findall(r"\b(\d+)L?\s*\*\s*x\d+\b|\bx\d+\s*\*\s*(\d+)L?\b|\b(\d+)L?\s*\+\s*\d*L?\*?x\d+\b", code)
    return [value for term in hits for value in term if value and int(value) > INT32_MAX]


def inductor_code(fn, *args) -> str:
    from torch._inductor.utils import run_and_get_code

    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    _, code = run_and_get_code(compiled, *args)
    return "\n".join(code)


@pytest.mark.compiled
def test_keyed_bits_index_code_stays_in_int32():
    """The keyed hash through inductor (CPU code; its index expressions are the ones the Triton
    code gets): no index term beyond int32, and the same bits as eager."""
    key, indices = torch.tensor(train_key(1, 2)), torch.arange(10, 30)
    counters = kr.weyl_counters(9, indices.device)  # made outside, as TrainAugment makes them
    code = inductor_code(lambda k, i, c: kr.keyed_bits(k, i, 9, c), key, indices, counters)
    assert wide_index_constants(code) == []
    torch.testing.assert_close(torch.compile(lambda k, i, c: kr.keyed_bits(k, i, 9, c))(key, indices, counters),
                               kr.keyed_bits(int(key), indices, 9), rtol=0, atol=0)


@pytest.mark.compiled
def test_mixing_index_code_stays_in_int32():
    """MixUp/CutMix's partner permutation hashes an arange: the same check on its compiled code."""
    x = torch.randn(6, 3, 8, 8)
    labels = torch.arange(6)
    cfg = AugmentConfig(mixup_alpha=0.8, cutmix_alpha=1.0)
    row = torch.tensor(mixing.mix_row(cfg, seed=0, epoch=1, step=2, height=8, width=8), dtype=torch.float64)
    code = inductor_code(lambda a, y, r: mixing.mix_rows(a, y, r), x, labels, row)
    assert wide_index_constants(code) == []


@pytest.mark.compiled
def test_the_index_check_finds_a_wide_constant():
    """Not vacuous: the old hash's counters (arange * 0x9E3779B9) are found in inductor's code."""
    code = inductor_code(lambda i: (i.unsqueeze(-1) + torch.arange(1, 4) * 0x9E3779B9) & kr.MASK32,
                         torch.arange(5))
    assert "2654435769" in wide_index_constants(code)


@pytest.mark.compiled
@pytest.mark.parametrize("side", [1, 2, 4])
def test_small_map_depthwise_compiles_with_inductor(side):
    """The small-map depthwise convolution (model.small_map_dw) through inductor, forward and
    backward, as the compiled step runs it: the same values and gradients as eager."""
    from fastcifar.small_maps import SmallMapDepthwiseConv2d

    conv = SmallMapDepthwiseConv2d(12, 7)
    x = torch.randn(3, 12, side, side).to(memory_format=torch.channels_last)

    def step(inp):
        out = conv(inp)
        return out, torch.autograd.grad(out.square().sum(), [inp, conv.weight, conv.bias])

    ours = torch.compile(step, dynamic=False)(x.clone().requires_grad_())
    ref = step(x.clone().requires_grad_())
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
