"""Test-wide setup: run Triton kernels through the interpreter where no CUDA device exists."""
# This must run before anything imports torch or triton: triton decides at decoration time
# (when a module defining a @triton.jit kernel is imported) whether kernels are interpreted.
import os
import shutil

if not os.environ.get("CUDA_VISIBLE_DEVICES") and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
