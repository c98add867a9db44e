"""fastcifar.bench.launches: group-aware FLOPs, kernel launches counted on fake CUDA tensors, profiler names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastcifar.bench.launches import (count_flops, count_launches, fake_cuda, foreach_launches, is_launch_call,
                                profile_launches)


def conv_forward_flops(n: int, weight_shape: tuple, out_hw: tuple) -> int:
    """2 * N * prod(weight) * prod(output spatial): multiply-adds of a convolution, per group."""
    c_out, c_in_per_group, kh, kw = weight_shape
    return 2 * n * c_out * c_in_per_group * kh * kw * out_hw[0] * out_hw[1]


def test_depthwise_conv_backward_costs_twice_its_forward():
    """A depthwise 7x7 layer (ConvNeXt's): torch.utils.flop_counter's own formula counts the weight
    gradient ~C times over (forward 20 MFLOP, backward ~10 GFLOP); each gradient costs one forward."""
    conv = torch.nn.Conv2d(128, 128, 7, padding=3, groups=128)
    x = torch.randn(25, 128, 8, 8, requires_grad=True)
    forward = conv_forward_flops(25, tuple(conv.weight.shape), (8, 8))
    assert forward == 20_070_400
    assert count_flops(lambda: conv(x)) == forward
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward  # forward, input grad, weight grad


@pytest.mark.parametrize("groups", [1, 4])
def test_grouped_and_dense_convs_count_one_forward_per_gradient(groups):
    conv = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=groups)
    x = torch.randn(3, 16, 9, 9)
    forward = conv_forward_flops(3, tuple(conv.weight.shape), (5, 5))
    assert count_flops(lambda: conv(x).sum().backward()) == 2 * forward  # no input grad asked for
    x.requires_grad_(True)
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward


def test_transposed_conv_counts_like_its_forward():
    conv = torch.nn.ConvTranspose2d(8, 12, 3, stride=2, groups=2)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    forward = count_flops(lambda: conv(x))
    assert forward == 2 * 2 * 8 * 6 * 9 * 25  # per input pixel: C_in x C_out/groups x k x k
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward


@pytest.mark.parametrize("numels,depth,launches", [
    ([100] * 342, 2, 6),  # 64 tensors per launch at depth 2
    ([100] * 110, 1, 1), ([100] * 111, 1, 2),
    ([65536 * 320 + 1], 1, 2),  # 320 blocks fill a launch; the last chunk needs another
    ([0, 0], 3, 0), ([], 1, 0),
])
def test_foreach_launches_follow_multi_tensor_apply(numels, depth, launches):
    assert foreach_launches(numels, depth) == launches


def test_host_tensors_given_to_cuda_ops_are_counted():
    """`seen[i] = True` copies a host scalar tensor over (a CUDA graph refuses it while capturing);
    index_fill_ and a device-side where() take the scalar as an argument: nothing to report."""
    with fake_cuda():
        seen = torch.zeros(10, dtype=torch.bool, device="cuda")
        idx, keep = torch.arange(3, device="cuda"), torch.ones(3, dtype=torch.bool, device="cuda")
        bad = count_launches(lambda: seen.__setitem__(idx, True))
        good = count_launches(lambda: (seen.index_fill_(0, idx, True), seen.__setitem__(idx, keep),
                                       torch.where(keep, idx, 0)))
    assert dict(bad.host_inputs) == {"aten.index_put_": 1}
    assert not good.host_inputs and good.launches == 4  # the fill, the put, where and its scalar on the device


def test_views_are_free_and_host_ops_are_not_launches():
    with fake_cuda():
        x, w = torch.randn(16, 8, device="cuda"), torch.randn(4, 8, device="cuda")
        host = torch.ones(3)

        def f():
            y = (x.t().t() @ w.t()).relu()  # t: views; mm, relu: 2 launches
            host.mul(2)  # a CPU op: no GPU launch
            return y.view(-1).sum()  # view: free; sum: 1

        c = count_launches(f)
    assert c.launches == 3 and dict(c.ops) == {"aten.mm": 1, "aten.relu": 1, "aten.sum": 1}
    assert c.free["aten.t"] == 3 and c.free["aten.view"] == 1 and c.host["aten.mul"] == 1


def test_autocast_casts_are_launches_on_fake_cuda():
    with fake_cuda() as fake:
        lin = fake.module(torch.nn.Linear(8, 4))
        x = torch.randn(16, 8, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            c = count_launches(lambda: lin(x))
    assert c.ops["aten._to_copy"] == 3 and c.ops["aten.addmm"] == 1  # input, weight, bias cast to bf16


def test_a_training_step_counts_forward_backward_and_foreach_sgd():
    """Linear -> relu -> sum, backward, SGD with momentum (foreach, as on CUDA), second step.

    forward 3 (addmm, relu, sum); backward 4 (ones_like for the root, threshold_backward, mm for
    the weight, the bias gradient summed over the batch); SGD 3 foreach ops over 2 tensors
    (momentum *= 0.9, += grad, param -= lr * momentum); zero_grad(set_to_none) none."""
    lin = torch.nn.Linear(8, 4)
    with fake_cuda() as fake:
        lin = fake.module(lin)
        assert lin.weight.device.type == "cuda" and isinstance(lin.weight, torch.nn.Parameter)
        x = torch.randn(16, 8, device="cuda")
        opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            lin(x).relu().sum().backward()
            opt.step()

        c = count_launches(step, warmup=1, calls=2)
    assert c.launches == 10
    assert c.ops["aten._foreach_mul_"] == 1 and c.ops["aten._foreach_add_"] == 2
    assert c.ops["aten.sum"] == 2 and c.ops["aten.mm"] == 1 and c.ops["aten.threshold_backward"] == 1


def test_gradients_reach_every_leaf_with_the_right_shapes():
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    with fake_cuda() as fake:
        conv = fake.module(conv)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        x = fake.tensor(torch.randn(2, 3, 8, 8, requires_grad=True))
        count_launches(lambda: F.gelu(conv(x)).mean().backward())
        assert conv.weight.grad.shape == conv.weight.shape and conv.bias.grad.shape == (4,)
        assert x.grad.shape == x.shape


def test_host_reads_are_syncs_and_answer_zero():
    with fake_cuda():
        x = torch.randn(10, device="cuda")
        seen = []
        c = count_launches(lambda: seen.append((x.sum().item(), x.nonzero().shape)))
    assert seen == [(0.0, (10, 1))]  # the largest nonzero answer
    assert c.syncs == 2 and c.ops["aten.sum"] == 1


def test_triton_kernels_count_without_running():
    from fastcifar.kernels import masked_cross_entropy

    with fake_cuda():
        logits = torch.randn(100, 100, device="cuda", requires_grad=True)
        labels = torch.randint(0, 100, (100,), device="cuda")
        c = count_launches(lambda: masked_cross_entropy(logits, labels, 2.0).loss.backward())
    triton = {k: v for k, v in c.ops.items() if k.startswith("triton.")}
    assert triton == {"triton._ce_tile_kernel": 1, "triton._scale_grad_kernel": 1}  # one program: no reduce launch


def test_profiler_launch_call_names():
    for name in ("cudaLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync",
                 "cudaLaunchKernelExC_v11060"):
        assert is_launch_call(name), name
    for name in ("cudaStreamSynchronize", "cudaEventRecord", "aten::mm", "cudaGetDevice", "void gemm_kernel"):
        assert not is_launch_call(name), name


def test_counting_refuses_backward_with_create_graph():
    with fake_cuda():
        x = torch.randn(3, device="cuda", requires_grad=True)
        with pytest.raises(NotImplementedError, match="create_graph"):
            count_launches(lambda: (x * x).sum().backward(create_graph=True))


def test_code_that_builds_host_constants_counts_on_fake_cuda():
    """train_augment makes small CPU tensors and copies them over; FakeTensorMode must not try a real GPU."""
    from fastcifar.augment import train_augment
    from fastcifar.config import AugmentConfig

    with fake_cuda():
        images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, device="cuda")
        c = count_launches(lambda: train_augment(images, torch.arange(16, device="cuda"), seed=0, epoch=0,
                                                 cfg=AugmentConfig()))
    assert c.launches > 50 and c.syncs == 0  # batched on the device, no read back to the host


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the profiler's CUDA launch calls need a CUDA GPU")
def test_profiler_counts_the_launches_of_real_kernels():
    a = torch.randn(4096, device="cuda")
    counts = profile_launches(lambda: (a * 2).relu().sum(), calls=2)
    assert counts["cpu_launch_calls"] >= 3 and counts["gpu_kernels"] >= 3 and counts["graph_launches"] == 0
