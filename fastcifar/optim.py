"""SGD with momentum over the parameters the current phase trains, fused, with the lr as a device tensor.

The frozen phase steps the head alone: an optimizer built over the head's parameters touches
nothing else (one SGD over the whole model would walk all of its parameters every step only to
skip the frozen ones). The momentum of a parameter lives here, keyed by its name, so it carries
across phases and checkpoints whatever the phase. The learning rate is one 0-d tensor on the device
that the training step updates in place: a CUDA graph or a compiled step reads it without
re-capture or recompilation. `fused=True` is one multi-tensor kernel per step on CUDA and the CPU.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .config import OptimConfig


class PhaseSGD:
    """torch.optim.SGD over the trainable parameters of the phase; `enter` switches phases."""

    def __init__(self, model: nn.Module, cfg: OptimConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.names = {p: name for name, p in model.named_parameters()}
        self.lr = torch.zeros((), dtype=torch.float32, device=device)  # per step, set by the schedule
        self.momentum: dict[str, torch.Tensor] = {}  # name -> buffer, for every parameter ever stepped
        self.sgd: torch.optim.SGD | None = None
        self.params: tuple[nn.Parameter, ...] = ()

    def enter(self, params: Iterable[nn.Parameter]) -> None:
        """Step `params` from now on (their momentum buffers, if any, carry over)."""
        self.params = tuple(params)
        self.sgd = torch.optim.SGD(self.params, lr=0.0, momentum=self.cfg.momentum,
                                   nesterov=self.cfg.nesterov, weight_decay=self.cfg.weight_decay,
                                   fused=True)
        # The tensor goes in after construction: SGD's own check of a tensor lr (lr < 0) would read
        # it back to the host.
        for group in self.sgd.param_groups:
            group["lr"] = self.lr
        if self.cfg.momentum == 0:
            return
        # A new buffer starts at zero, which is SGD's first step exactly (0 * momentum + grad = grad,
        # there being no dampening), so every step is the same "not first" step: the fused kernel
        # takes no list with holes in it, and a captured graph has no first-step branch.
        for p in self.params:
            name = self.names[p]
            if name not in self.momentum:
                self.momentum[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.sgd.state[p]["momentum_buffer"] = self.momentum[name]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        """{"momentum": {parameter name: buffer}}: independent of the phase it was saved in."""
        return {"momentum": dict(self.momentum)}

    def load_state_dict(self, state: dict) -> None:
        known = set(self.names.values())
        unknown = sorted(set(state["momentum"]) - known)
        if unknown:
            raise ValueError(f"optimizer state for parameters this model does not have: {unknown[:3]}")
        params = {name: p for p, name in self.names.items()}
        for name, buf in state["momentum"].items():  # in place: the SGD of this phase holds them
            if name not in self.momentum:
                # laid out as its parameter (channels_last included), whatever the file's layout:
                # the fused kernel walks parameter and buffer as one flat array each
                self.momentum[name] = torch.empty_like(params[name], memory_format=torch.preserve_format)
            self.momentum[name].copy_(buf)
        if self.sgd is not None:
            self.enter(self.params)
