"""Depthwise convolutions on small maps (issue 19): equal to the stock conv, forward and backward."""

import copy
import dataclasses

import pytest
import timm
import torch
from torch import nn

from fastcifar import small_maps
from fastcifar.config import ConfigError, build_config
from fastcifar.model import ModelError, build_model
from fastcifar.small_maps import SmallMapDepthwiseConv2d, apply_small_map_depthwise

F64 = dict(atol=1e-12, rtol=1e-12)  # float64: the two paths only sum in a different order (seen: <= 9e-15)
# Gradients under autocast, relative to the largest |value| of the stock one: a few roundings of bf16
# (8 significant bits) or fp16 (11); the weight gradient is rounded per tap before the taps are summed.
AUTOCAST_GRAD_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture
def small_path_calls(monkeypatch):
    """A list that gets one entry per call of the small-map path (to prove which path ran)."""
    calls, real = [], small_maps.small_map_depthwise

    def spy(x, weight, bias):
        calls.append(tuple(x.shape))
        return real(x, weight, bias)

    monkeypatch.setattr(small_maps, "small_map_depthwise", spy)
    return calls


def _pair(channels, k, bias, dtype=torch.float64, seed=0):
    """A random stock depthwise conv (channels_last weights) and its replacement sharing its parameters."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels, bias=bias, dtype=dtype)
    if bias:  # the default init is small; a bias of the size of the output tests the addition
        nn.init.normal_(conv.bias)
    conv = conv.to(memory_format=torch.channels_last)
    return conv, SmallMapDepthwiseConv2d.from_conv(conv)


def _run(module, x, grad_out, params):
    """Output and the gradients of x and `params` for upstream gradient grad_out."""
    x = x.detach().requires_grad_()
    y = module(x)
    return y, torch.autograd.grad(y, (x, *params), grad_out)


def _input(n, c, h, w, dtype=torch.float64, channels_last=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, dtype=dtype, generator=g)
    return x.to(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 3), (4, 4), (2, 3), (1, 4), (8, 8)])
@pytest.mark.parametrize("channels,bias", [(5, True), (37, False)])
def test_forward_and_gradients_equal_the_stock_conv_in_float64(k, hw, channels, bias, small_path_calls):
    conv, new = _pair(channels, k, bias)
    x = _input(3, channels, *hw)
    grad_out = _input(3, channels, *hw, seed=2)  # non-unit, random: every tap's gradient differs
    params = [conv.weight] + ([conv.bias] if bias else [])
    want, want_grads = _run(conv, x, grad_out, params)
    got, got_grads = _run(new, x, grad_out, params)
    torch.testing.assert_close(got, want, **F64)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **F64)
    reach = k // 2 + 1
    assert len(small_path_calls) == (max(hw) <= reach)  # small maps take the new path, others the stock conv


@pytest.mark.parametrize("channels,side", [(1024, 1), (512, 2), (256, 4)])
def test_convnext_b_shapes_at_32px_input(channels, side, small_path_calls):
    conv, new = _pair(channels, 7, True)
    x, grad_out = _input(2, channels, side, side), _input(2, channels, side, side, seed=2)
    want, want_grads = _run(conv, x, grad_out, [conv.weight, conv.bias])
    got, got_grads = _run(new, x, grad_out, [conv.weight, conv.bias])
    torch.testing.assert_close(got, want, **F64)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **F64)
    assert small_path_calls == [(2, channels, side, side)]


@pytest.mark.parametrize("channels_last", [True, False])
def test_output_layout_follows_the_input(channels_last):
    conv, new = _pair(6, 7, True)
    conv, new = conv.to(memory_format=torch.contiguous_format), new.to(memory_format=torch.contiguous_format)
    x = _input(3, 6, 3, 2, channels_last=channels_last)
    got, want = new(x), conv(x)
    assert got.stride() == want.stride()
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels,side", [(512, 2), (37, 3), (64, 1)])
def test_autocast_gives_the_stock_dtype_and_values(dtype, channels, side):
    conv, new = _pair(channels, 7, True, dtype=torch.float32)
    x, grad_out = _input(4, channels, side, side, torch.float32), _input(4, channels, side, side, dtype, seed=2)
    params = [conv.weight, conv.bias]
    with torch.autocast("cpu", dtype=dtype):
        want, want_grads = _run(conv, x, grad_out, params)
        got, got_grads = _run(new, x, grad_out, params)
    assert got.dtype == want.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    # Both sum the products of the cast values in fp32 and round once: at most one ulp apart per element
    # (rounding each product to `dtype` before the sum, as plain bf16 ops would: tens to thousands of ulps).
    torch.testing.assert_close(got, want, atol=0, rtol=torch.finfo(dtype).eps)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == w.dtype == torch.float32  # the parameters' and the input's own dtype
        scale = w.abs().max().item()
        torch.testing.assert_close(g, w, atol=AUTOCAST_GRAD_TOL[dtype] * scale, rtol=0)


def test_autocast_leaves_float64_alone_as_conv2d_does():
    conv, new = _pair(5, 7, True)
    x = _input(2, 5, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = new(x), conv(x)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, **F64)


@pytest.mark.compiled
def test_compiles_into_one_graph_per_path():
    # aot_eager traces forward and backward as inductor would see them, without inductor's slow CPU codegen.
    conv, new = _pair(8, 7, True, dtype=torch.float32)
    compiled = torch.compile(new, fullgraph=True, backend="aot_eager", dynamic=False)  # a break raises
    for side in (2, 8):  # the small path and the stock path
        x, grad_out = _input(2, 8, side, side, torch.float32), _input(2, 8, side, side, torch.float32, seed=2)
        want, want_grads = _run(conv, x, grad_out, [conv.weight, conv.bias])
        got, got_grads = _run(compiled, x, grad_out, [conv.weight, conv.bias])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def _convnext(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("test_convnext", pretrained=False).double()
    for p in model.parameters():  # timm zero-inits biases; random ones make every term count
        if p.dim() == 1:
            nn.init.normal_(p, std=0.2)
    return model.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("size,small_calls", [(32, 8), (64, 6)])
def test_swapped_convnext_equals_the_stock_one(size, small_calls, small_path_calls):
    # test_convnext: stem /4, then 4 stages of 1, 2, 4, 2 blocks. At 32 px the maps are 8, 4, 2, 1:
    # 8 blocks take the small path; at 64 px (16, 8, 4, 2) 6 do and the rest take the stock conv.
    stock = _convnext()
    swapped = copy.deepcopy(stock)
    weights = [b.conv_dw.weight for s in swapped.stages for b in s.blocks]
    assert apply_small_map_depthwise(swapped) == 9
    assert all(a is b for a, b in zip(weights, (b.conv_dw.weight for s in swapped.stages for b in s.blocks)))  # shared
    assert apply_small_map_depthwise(swapped) == 0  # a second pass finds nothing left to swap
    assert {k: v.shape for k, v in swapped.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}

    x = _input(3, 3, size, size)
    outs = []
    for model in (stock, swapped):
        model.zero_grad()
        y = model(x)
        y.backward(torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(2)))
        outs.append((y, {n: p.grad for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = outs
    torch.testing.assert_close(got, want, **F64)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **F64, msg=name)
    assert len(small_path_calls) == small_calls


def test_only_exact_stride_1_same_padded_depthwise_convs_are_swapped():
    dw = dict(groups=8, padding=3)
    model = nn.Sequential(
        nn.Conv2d(8, 8, 7, **dw),  # the one that qualifies
        nn.Conv2d(8, 8, 7, padding=3),  # dense
        nn.Conv2d(8, 8, 7, stride=2, **dw),
        nn.Conv2d(8, 8, 7, groups=8, padding=2),
        nn.Conv2d(8, 8, 4, groups=8, padding=2),  # even kernel
        nn.Conv2d(8, 8, 7, dilation=2, **dw),
        nn.Conv2d(8, 8, 7, padding_mode="reflect", **dw),
        nn.Conv2d(8, 16, 7, **dw),  # depth multiplier 2
    )
    assert apply_small_map_depthwise(model) == 1
    assert [type(m) for m in model].count(SmallMapDepthwiseConv2d) == 1 and type(model[0]) is SmallMapDepthwiseConv2d


def _model_cfg(**kw):
    return dataclasses.replace(build_config("smoke").model, **kw)


def test_config_switch_builds_the_swapped_model_and_refuses_bad_values():
    def swapped(model):
        return sum(isinstance(m, SmallMapDepthwiseConv2d) for m in model.modules())

    assert build_config("smoke").model.small_map_dw == "off" and swapped(build_model(_model_cfg())) == 0
    on = build_config("smoke", {"model.small_map_dw": "on"}).model
    model = build_model(on)  # convnext_atto: 2 + 2 + 6 + 2 blocks
    assert swapped(model) == 12 and swapped(model.backbone) == 12
    assert model.backbone.stages[3].blocks[0].conv_dw.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ConfigError, match="model.small_map_dw='yes'; valid: on, off"):
        build_config("smoke", {"model.small_map_dw": "yes"})
    with pytest.raises(ModelError, match="no stride-1 depthwise convolution"):
        build_model(_model_cfg(name="test_resnet", small_map_dw="on"))
