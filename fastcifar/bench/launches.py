"""What one call of a step costs, counted without timing it: kernel launches on fake CUDA tensors,
FLOPs with a group-aware convolution backward, and CPU-side launch calls read from torch.profiler.

Launches on fake CUDA (`count_launches`): the step runs under torch's FakeTensorMode on "cuda"
tensors (shapes, dtypes and dispatch as on a GPU, no memory, no GPU needed), and every op that
reaches the dispatcher is classified:
  counted   - an aten op that touches a CUDA tensor and makes the GPU do work: compute, copies
              (host<->device included), fills and random draws: one launch each; a `_foreach_*` or
              `_fused_*` op launches once per chunk of its tensor lists (`foreach_launches`); any
              other namespace (a `torch.library.custom_op`) one each unless told otherwise; a Triton
              kernel started from Python one each (it never reaches the dispatcher, so `run` is
              intercepted and the kernel is not compiled);
  free      - views and other aliasing ops (view, t, permute, expand, slice, detach ...) and
              metadata or allocation only (empty*, new_empty*, prim.device, sym sizes): no kernel;
  host      - ops on CPU tensors only (a scalar on the host): no GPU launch;
  syncs     - `.item()`-like reads (`_local_scalar_dense`) and data-dependent shapes (`nonzero`):
              each is also a device-to-host sync; under fake tensors they answer 0 / the largest
              shape, so control flow takes the common path;
  host_inputs - ops on CUDA tensors that also take a host tensor (`x[i] = True` makes a CPU
              scalar tensor and copies it over): a CUDA graph refuses the copy from pageable
              memory while capturing (the H200 run of 2026-12-04 met one in the step's statistics).
Backward runs through `python_backward` (autograd's C++ engine asks for a CUDA context, which a
machine without a GPU lacks): each node's backward formula is called under the counter, in
dependency order; a gradient that meets another costs one add; tensor hooks are not run.
`torch.cuda.is_available()` answers True inside `fake_cuda()`, so `torch.autocast("cuda")` and
the optimisers' CUDA defaults (foreach) behave as on a GPU.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator
from unittest import mock

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

# ATen's multi_tensor_apply (MultiTensorApply.cuh): a launch whenever a chunk list is full.
CHUNK_ELEMENTS = 65536  # elements per block's chunk
MAX_BLOCKS = 320  # blocks per launch
MAX_TENSORS = (110, 64, 48, 36, 30)  # tensors per launch by list depth 1..5

_FREE = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_", "set_", "device",
         "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_unsafe_view",
         "_reshape_alias", "lift_fresh", "is_contiguous", "size", "stride"}
_SYNCS = {"_local_scalar_dense", "nonzero", "item"}


@dataclass
class LaunchCount:
    """Launches of the counted calls (per call when several were counted)."""

    launches: float = 0.0  # kernel launches on the GPU, foreach chunks included
    ops: Counter = field(default_factory=Counter)  # op name -> launches
    free: Counter = field(default_factory=Counter)  # views / metadata ops seen, not counted
    host: Counter = field(default_factory=Counter)  # ops on host tensors only
    syncs: float = 0.0  # device-to-host reads
    host_inputs: Counter = field(default_factory=Counter)  # CUDA ops given a host tensor: op name -> calls

    def scaled(self, factor: float) -> "LaunchCount":
        return LaunchCount(self.launches * factor, Counter({k: v * factor for k, v in self.ops.items()}),
                           self.free, self.host, self.syncs * factor, self.host_inputs)


def foreach_launches(numels: list[int], depth: int) -> int:
    """Kernel launches of one multi-tensor op over tensors of `numels` elements with `depth` lists
    (inputs plus outputs), as ATen's multi_tensor_apply queues them: a launch whenever
    MAX_TENSORS[depth - 1] tensors or MAX_BLOCKS chunks of CHUNK_ELEMENTS are queued, and one for
    the rest; a tensor split across launches is carried into the next one."""
    max_tensors = MAX_TENSORS[min(max(depth, 1), len(MAX_TENSORS)) - 1]
    launches, tensors, blocks = 0, 0, 0
    for n in (n for n in numels if n > 0):
        tensors += 1
        chunks = math.ceil(n / CHUNK_ELEMENTS)
        for chunk in range(chunks):
            blocks += 1
            last = chunk == chunks - 1
            if (tensors == max_tensors and last) or blocks == MAX_BLOCKS:
                launches += 1
                blocks, tensors = 0, 0 if last else 1
    return launches + (1 if blocks else 0)


def _tensors(tree) -> Iterator[torch.Tensor]:
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            yield leaf


def _is_view(func) -> bool:
    """An op that returns an alias of an input and writes nothing: a view, no kernel."""
    schema = func._schema
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return False
    return bool(schema.returns) and all(r.alias_info is not None for r in schema.returns)


class _Counter(TorchDispatchMode):
    """Classifies every dispatched op (see the module docstring); sits above FakeTensorMode."""

    def __init__(self, custom_launches: dict[str, int]):
        super().__init__()
        self.count, self.custom = LaunchCount(), custom_launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, _, name = func._schema.name.rpartition("::")
        if name in _SYNCS and namespace == "aten":
            return self._sync(func, name, args, kwargs)
        key = f"{namespace}.{name}"
        if name.startswith("_fused_") and not func._schema.returns:
            # The fused optimizers have no fake (meta) kernel; they only update their inputs in
            # place, which fake tensors do not need: count them without running them.
            self._add(key, self._launches(name, namespace, args, kwargs))
            return None
        out = func(*args, **kwargs)
        inputs = list(_tensors((args, kwargs)))
        if any(t.device.type == "cpu" for t in inputs) and any(t.device.type == "cuda"
                                                              for t in (*inputs, *_tensors(out))):
            self.count.host_inputs[key] += 1
        if namespace == "prim" or name in _FREE or _is_view(func):
            self.count.free[key] += 1
        elif not any(t.device.type == "cuda" for t in _tensors((args, kwargs, out))):
            self.count.host[key] += 1
        else:
            self._add(key, self._launches(name, namespace, args, kwargs))
        return out

    def _launches(self, name, namespace, args, kwargs) -> int:
        if namespace != "aten":
            return self.custom.get(f"{namespace}::{name}", 1)
        if name.startswith(("_foreach_", "_fused_", "_amp_foreach")):
            lists = [a for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple)) and a
                     and isinstance(a[0], torch.Tensor)]
            depth = len(lists) + (0 if name.endswith("_") else 1)  # an out-of-place op writes one more
            return foreach_launches([t.numel() for t in lists[0]], depth) if lists else 1
        return 1

    def _add(self, key: str, n: int) -> None:
        self.count.ops[key] += n
        self.count.launches += n

    def _sync(self, func, name, args, kwargs):
        x = args[0]
        if x.device.type == "cuda":
            self.count.syncs += 1
            self._add(f"aten.{name}", 1)
        else:
            self.count.host[f"aten.{name}"] += 1
        if name == "nonzero":  # the largest answer: every element non-zero
            return torch.empty((x.numel(), x.dim()), dtype=torch.long, device=x.device)
        return False if x.dtype == torch.bool else 0 if not x.is_floating_point() else 0.0


def _call_node(node, grads):
    if hasattr(node, "apply") and not callable(node):  # a Python autograd.Function's backward
        return node.apply(*grads)
    return node(*grads)


def _as_input(grad: torch.Tensor, node, slot: int) -> torch.Tensor:
    """The engine's check of a gradient against what `node` expects: a broadcast input gets the
    gradient summed to its shape, another dtype (autocast) a cast; each is a launch."""
    metadata = getattr(node, "_input_metadata", None)
    if metadata is not None and slot < len(metadata):
        shape, dtype = tuple(metadata[slot].shape), metadata[slot].dtype
    elif hasattr(node, "variable"):
        shape, dtype = tuple(node.variable.shape), node.variable.dtype
    else:
        return grad
    if tuple(grad.shape) != shape:
        grad = grad.sum_to_size(shape)
    return grad if grad.dtype == dtype else grad.to(dtype)


def python_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None, **_):
    """`torch.autograd.backward` done in Python: every node's backward formula called in dependency
    order, gradients of leaves accumulated into `.grad`. For counting only (no hooks, no streams)."""
    if create_graph or inputs is not None:
        raise NotImplementedError("python_backward supports backward() without create_graph or inputs")
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    grads = grad_tensors if grad_tensors is not None else [None] * len(tensors)
    grads = [grads] if isinstance(grads, torch.Tensor) else list(grads)
    roots = [(t.grad_fn, g if g is not None else torch.ones_like(t)) for t, g in zip(tensors, grads)]
    pending: Counter = Counter()  # node -> edges into it not yet delivered
    seen, stack = set(), [n for n, _ in roots if n is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                pending[nxt] += 1
                stack.append(nxt)
    buffers: dict = {}

    def deliver(node, slot: int, grad) -> None:
        buf = buffers.setdefault(node, {})
        buf[slot] = grad if slot not in buf or buf[slot] is None else buf[slot] + grad

    for node, grad in roots:
        if node is not None:
            deliver(node, 0, grad)
    ready = [n for n, _ in roots if n is not None and pending[n] == 0]
    with torch.no_grad():
        while ready:
            node = ready.pop()
            buf = buffers.pop(node, {})
            if type(node).__name__ == "AccumulateGrad":
                leaf, g = node.variable, buf.get(0)
                if g is not None:
                    leaf.grad = g if leaf.grad is None else leaf.grad.add_(g)
                continue
            n_out = len(getattr(node, "_input_metadata", ())) or (max(buf) + 1 if buf else 1)
            outs = _call_node(node, [buf.get(i) for i in range(n_out)])
            outs = outs if isinstance(outs, tuple) else (outs,)
            for (nxt, slot), g in zip(node.next_functions, outs):
                if nxt is None:
                    continue
                if g is not None:
                    deliver(nxt, slot, _as_input(g, nxt, slot))
                pending[nxt] -= 1
                if pending[nxt] == 0:
                    ready.append(nxt)


@contextlib.contextmanager
def _counting(counter: _Counter) -> Iterator[None]:
    """The counter on top of the fake mode; backward through `python_backward`; a Triton kernel
    started from Python counted as one launch, neither compiled nor run."""
    classes = []
    with contextlib.suppress(ImportError):
        from triton.runtime.jit import JITFunction

        classes.append(JITFunction)
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)

    def fake_run(kernel, *args, **kwargs):
        name = getattr(getattr(kernel, "fn", None), "__name__", None) or getattr(kernel, "__name__", "kernel")
        counter._add(f"triton.{name}", 1)

    with contextlib.ExitStack() as stack:
        for cls in classes:
            stack.enter_context(mock.patch.object(cls, "run", fake_run))
        stack.enter_context(mock.patch.object(torch.autograd, "backward", python_backward))
        stack.enter_context(counter)
        yield


class FakeCuda:
    """What `fake_cuda()` yields: turns real modules and tensors into fake CUDA ones."""

    def __init__(self, mode):
        self.mode = mode

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A fake CUDA tensor with `t`'s shape, dtype, strides and requires_grad."""
        fake = self.mode.from_tensor(t.detach()).to("cuda")
        return fake.requires_grad_(t.requires_grad) if t.requires_grad else fake

    def module(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` with every parameter and buffer replaced by a fake CUDA copy, in place.

        Build the module first, outside `fake_cuda()` (initialisers such as timm's read values,
        which fake tensors do not have)."""
        for m in module.modules():
            for name, p in m._parameters.items():
                if p is not None:
                    m._parameters[name] = torch.nn.Parameter(self.tensor(p), requires_grad=p.requires_grad)
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = self.tensor(b)
        return module


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeCuda]:
    """Fake tensors: make CUDA ones with device="cuda" (the default device stays the CPU, as code
    that builds host constants expects), bring real modules and tensors in with `.module(m)` and
    `.tensor(t)`, then count with `count_launches`. No GPU is used or needed. torch.cuda.is_available() and
    is_bf16_supported() answer True, and fake tensors count as plain tensors for the optimisers'
    foreach/fused defaults, so autocast and the optimisers take their CUDA paths."""
    import torch.optim.optimizer as optimizer_module
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    patches = [(torch.cuda, "is_available", lambda: True), (torch.cuda, "is_bf16_supported", lambda *a, **k: True),
               (optimizer_module, "_foreach_supported_types", [torch.Tensor, torch.nn.Parameter, FakeTensor])]
    # Where FakeTensorMode asks torch.cuda.is_available() as it dispatches (a property), it would
    # copy host constants to a real GPU once that answers True: it must keep avoiding the device.
    if isinstance(getattr(FakeTensorMode, "avoid_device_init", None), property):
        patches.append((FakeTensorMode, "avoid_device_init", property(lambda self: True)))
    with contextlib.ExitStack() as stack:
        mode = stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        for owner, name, value in patches:
            if hasattr(owner, name):  # torch versions differ in what they have
                stack.enter_context(mock.patch.object(owner, name, value))
        yield FakeCuda(mode)


def count_launches(step: Callable[[], object], *, calls: int = 1, warmup: int = 0,
                   custom_launches: dict[str, int] | None = None) -> LaunchCount:
    """Launches per call of `step`, run inside `fake_cuda()` (enter it first and build there).

    `warmup` calls run uncounted first (an optimiser's first step allocates its state);
    `custom_launches` gives the launches of a custom op per call ("ns::name" -> n; default 1).
    """
    custom = custom_launches or {}
    with _counting(_Counter(custom)):  # uncounted
        for _ in range(warmup):
            step()
    counter = _Counter(custom)
    with _counting(counter):
        for _ in range(calls):
            step()
    return counter.count.scaled(1 / calls)


# ---- FLOPs ----


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **_kw) -> int:
    """Each requested gradient of a convolution costs what its forward costs.

    The weight's shape already holds channels per group (C_out, C_in / groups, *k), so the
    forward count 2 * N * prod(w) * prod(output spatial) is right for grouped and depthwise
    convolutions; torch.utils.flop_counter's own backward formula multiplies the weight
    gradient by the groups (a depthwise 7x7 layer: ~C times too many).
    """
    spatial = x_shape[2:] if transposed else grad_out_shape[2:]
    forward = 2 * x_shape[0] * math.prod(w_shape) * math.prod(spatial)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn`: matmuls and convolutions, forward and backward, counted by
    torch.utils.flop_counter with a group-aware convolution backward (elementwise ops, norms and
    the optimiser are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


# ---- CPU-side launches on a real GPU ----

_LAUNCH_CALL = re.compile(r"^cu(da)?(LaunchKernel|LaunchCooperativeKernel|GraphLaunch|Memcpy|Memset)", re.I)


def is_launch_call(name: str) -> bool:
    """A CUDA runtime/driver call that puts work on the GPU: a kernel or graph launch, a copy or
    a fill (cudaLaunchKernel, cuLaunchKernelEx (Triton), cudaGraphLaunch, cudaMemcpyAsync ...)."""
    return bool(_LAUNCH_CALL.match(name))


def profile_launches(fn: Callable[[], object], calls: int = 1) -> dict:
    """CPU-side launch calls and GPU kernels per call of `fn`, read from torch.profiler.

    Returns {"cpu_launch_calls": per call, "gpu_kernels": per call, "graph_launches": per call};
    on a machine without CUDA, or where the profiler fails to start ("error" says why), None.
    """
    from torch.profiler import ProfilerActivity, profile

    none = {"cpu_launch_calls": None, "gpu_kernels": None, "graph_launches": None}
    if not torch.cuda.is_available():
        return none
    torch.cuda.synchronize()
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    try:
        prof.__enter__()
    except RuntimeError as e:  # a profiler that cannot start (CUPTI) must not cost the measurement
        return none | {"error": f"{type(e).__name__}: {e}"[:300]}
    try:  # an error in fn itself is the caller's to see, not a profiler failure
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    finally:
        prof.__exit__(None, None, None)
    events = list(prof.events())
    launch_calls = [e.name for e in events if is_launch_call(e.name)]
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    return {"cpu_launch_calls": len(launch_calls) / calls, "gpu_kernels": len(kernels) / calls,
            "graph_launches": sum("GraphLaunch" in n for n in launch_calls) / calls}
