"""Test-wide setup: run Triton kernels through the interpreter where torch sees no CUDA device."""
# This must run before anything imports torch or triton: triton decides at decoration time
# (when a module defining a @triton.jit kernel is imported) whether kernels are interpreted.
# torch answers in a child process (fastcifar.benchreport imports no torch), once per session
# tree: the answer is kept in FASTCIFAR_CUDA for child processes.
import os

from fastcifar.benchreport import cuda_available

if not cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
