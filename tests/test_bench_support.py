"""fastcifar.bench's breakdown classifier and summary, the peer step (eager, on the CPU), and what a
benchmark row says about the modes an Engine's functions ran in."""

from __future__ import annotations

import math

import pytest
import torch

from fastcifar.bench.breakdown import CATEGORIES, classify_kernel, event_ms, summarise
from fastcifar.bench.modes import function_modes, phase_facts, shared_mode

# Kernel names as torch.profiler reports them on Hopper (cuDNN 9, cuBLAS 13, inductor, ATen, ours).
KERNELS = [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_"
     "execute_segment_k_off_kernel__5x_cudnn", "convolutions"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize64x128x64", "convolutions"),
    ("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816wgrad_optimized_bf16_64x64_64x5_nhwc_align8>("
     "cutlass_tensorop_bf16_s16816wgrad_optimized_bf16_64x64_64x5_nhwc_align8::Params)", "convolutions"),
    ("void cudnn::cnn::conv2d_grouped_direct_kernel<false, true, false, false, 0, 0, int, __nv_bfloat16>(...)",
     "convolutions"),
    ("void conv_depthwise2d_forward_kernel<7, float, int>(at::GenericPackedTensorAccessor<float, 4ul>)",
     "convolutions"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel",
     "matmuls (GEMM)"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(Params)",
     "matmuls (GEMM)"),
    ("nvjet_tst_128x64_64x8_2x1_v_bz_coopB_TNT", "matmuls (GEMM)"),
    ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn", "matmuls (GEMM)"),
    ("triton_tem_fused_addmm_0", "matmuls (GEMM)"),
    ("void cudnn::engines_precompiled::nhwcToNchwKernel<__nv_bfloat16, __nv_bfloat16, float, false, true>(...)",
     "copies"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<float, __nv_bfloat16, float, true, false>(...)", "copies"),
    ("Memcpy DtoD (Device -> Device)", "copies"),
    ("Memset (Device)", "copies"),
    ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_"
     "kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}>>(int, ...)", "copies"),
    ("triton_poi_fused__to_copy_add_mul_0", "normalisation and pointwise"),
    ("triton_red_fused_native_layer_norm_native_layer_norm_backward_12", "normalisation and pointwise"),
    ("triton_per_fused_convolution_backward_native_layer_norm_backward_3", "normalisation and pointwise"),
    ("triton_poi_fused_gelu_gelu_backward_mul_7", "normalisation and pointwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul>>(...)",
     "normalisation and pointwise"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>(int, float, ...)",
     "normalisation and pointwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float>>>(...)",
     "normalisation and pointwise"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorListMetadata<3>, at::native::(anonymous namespace)::FusedSgdMathFunctor<float, 3>, ...>", "optimizer"),
    ("_ce_tile_kernel", "loss"), ("_ce_loop_kernel", "loss"), ("_reduce_kernel", "loss"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
     "at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>(...)", "loss"),
    ("void at::native::(anonymous namespace)::grid_sampler_2d_kernel<float, int>(...)", "augmentation"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevComm*, unsigned long, ncclWork*)", "other"),
]


@pytest.mark.parametrize("name,category", KERNELS, ids=[f"{c}:{n[:40]}" for n, c in KERNELS])
def test_kernels_are_classified_by_name(name, category):
    assert category in CATEGORIES
    assert classify_kernel(name) == category


def test_the_summary_gives_ms_per_step_shares_and_the_top_kernels():
    records = [("sm90_xmma_fprop_implicit_gemm_x", 300.0), ("sm90_xmma_fprop_implicit_gemm_x", 300.0),
               ("triton_poi_fused_add_0", 100.0), ("_ce_tile_kernel", 20.0), ("Memcpy DtoD (Device -> Device)", 80.0)]
    s = summarise(records, steps=2, top=3)
    assert s["gpu_ms_per_step"] == pytest.approx(0.4) and s["kernels_per_step"] == pytest.approx(2.5)
    conv = s["categories"]["convolutions"]
    assert conv == {"ms_per_step": pytest.approx(0.3), "share": pytest.approx(0.75), "kernels_per_step": 1.0}
    assert math.isclose(sum(c["share"] for c in s["categories"].values()), 1.0)
    assert s["categories"]["other"]["ms_per_step"] == 0.0
    assert [k["name"] for k in s["top"]] == ["sm90_xmma_fprop_implicit_gemm_x", "triton_poi_fused_add_0",
                                             "Memcpy DtoD (Device -> Device)"]
    assert s["top"][0]["calls_per_step"] == 1.0 and s["top"][2]["category"] == "copies"
    assert summarise([], steps=1)["gpu_ms_per_step"] == 0.0  # nothing seen: no division by zero


def test_event_timing_on_the_cpu_uses_perf_counter():
    calls = []
    out = event_ms(lambda: calls.append(1), calls=3, rounds=2, warmup=1, device="cpu")
    assert len(calls) == 7 and out["timer"] == "perf_counter" and len(out["rounds_ms"]) == 2 and out["ms"] >= 0


@pytest.fixture
def restore_backend_flags():
    """The peer sets the trainer's global backend flags up; put back what the process had."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled())
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved[:3]
    torch.set_float32_matmul_precision(saved[3])
    torch.use_deterministic_algorithms(saved[4])


def test_the_peer_trains_the_plain_model_one_step_per_call(restore_backend_flags):
    """The peer's step, eager on the CPU (its compiled form is timed on a GPU): fused SGD moves the
    weights, and the timing says what it is."""
    from fastcifar.bench.peer import peer_step, time_peer

    step = peer_step("test_convnext", torch.device("cpu"), batch=4, compile_mode=None)
    before = [p.detach().clone() for p in step.model.parameters()]
    step()
    moved = sum(not torch.equal(b, p) for b, p in zip(before, step.model.parameters()))
    assert moved > len(before) / 2  # at random init every loss is above 2 nats: weight decay moves the non-zero ones
    out = time_peer("test_convnext", torch.device("cpu"), batch=4, compile_mode=None, warmup=1, calls=1, rounds=2)
    assert out["compile_mode"] == "eager" and out["ms_per_step"] > 0 and len(out["rounds_ms"]) == 2
    assert out["backend"]["tf32_matmul"] is True  # the trainer's set-up


class _Engine:
    mode = "graphs"

    def __init__(self, modes=None, fallbacks=()):
        self._modes, self._fallbacks = dict(modes or {}), list(fallbacks)

    def function_modes(self):
        return self._modes

    def report(self):
        return {"mode_fallbacks": self._fallbacks}


def test_rows_say_what_mode_each_function_ran_in():
    before = _Engine()  # no function has run yet: each is in the planned mode
    assert function_modes(before, ["full step"]) == {"full step": "graphs"}
    after = _Engine({"frozen features": "compiled", "head step": "graphs", "full step": "graphs"},
                    [{"from": "graphs", "to": "compiled", "where": "frozen features", "cause": "InductorError: x"}])
    facts = phase_facts(after, "head")
    assert facts["ran"] == "mixed" and facts["function_modes"] == {"frozen features": "compiled", "head step": "graphs"}
    assert facts["fallbacks"] == ["frozen features: graphs -> compiled (InductorError: x)"]
    assert phase_facts(after, "full")["ran"] == "graphs" and shared_mode({"a": "eager"}) == "eager"
