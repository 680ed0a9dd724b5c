"""Parameter streaming (`param_offload = "cpu"`): the UNet's working weights live in host memory and visit
the compute device only while the layer that owns them runs.

A *unit* is a module that owns parameters directly (a Linear, a Conv2d, a norm). Its weights are put on
the device ("attached": `param.data` swapped for a device copy, as FSDP does) just before its forward and
taken off ("detached") right after. Gradient checkpointing is required: the checkpointed blocks keep no
weights for backward, and recompute their forward there, which attaches the weights again. For backward,
a hook on each unit's outputs attaches its weights before its gradients are computed (so the saved
parameters and AccumulateGrad see them on the device), and they are detached once every one of its
parameters has received its gradient.

Copies run ahead of use on a side CUDA stream: each attach prefetches the units that followed it in the
same pass of the previous step (forward or backward), up to `lookahead_bytes`. A unit used for the first
time, or out of the recorded order, is copied on the spot. The optimizer updates the host weights during
its step; a step pre-hook drains the side stream and drops prefetched copies first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _Unit:
    module: torch.nn.Module
    params: list[torch.nn.Parameter]
    home: list[torch.Tensor]                 # the host tensors the parameters return to
    nbytes: int
    attached: bool = False
    waiting_grads: int = 0                   # parameters still to receive a gradient in this backward
    prefetched: list[torch.Tensor] | None = None
    event: object = None                     # CUDA event after which `prefetched` is complete


@dataclass
class _Pass:
    """Units in the order one kind of pass (forward or backward) asked for them, last step and this one."""

    previous: dict[int, int] = field(default_factory=dict)   # id(unit) -> position
    order: list[_Unit] = field(default_factory=list)
    current: list[_Unit] = field(default_factory=list)

    def restart(self) -> None:
        if self.current:
            self.order, self.current = self.current, []
            self.previous = {id(u): i for i, u in enumerate(self.order)}


class ParamStreamer:
    """Streams `model`'s parameters (which must already live on the host) to `device` unit by unit."""

    def __init__(self, model: torch.nn.Module, device, optimizer=None, lookahead_bytes: int = 64 * 2**20,
                 on_copy=None):
        self.device = torch.device(device)
        self.lookahead_bytes = lookahead_bytes
        self._on_copy = on_copy  # called with each device copy made (the estimator counts them as weights)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._units: list[_Unit] = []
        self._unit_of: dict[torch.nn.Parameter, _Unit] = {}
        model.register_forward_pre_hook(lambda module, args: self._start_forward(), prepend=True)
        model.register_forward_hook(lambda module, args, output: self._end_forward())
        for module in model.modules():
            params = [p for p in module._parameters.values() if p is not None]
            if params:
                nbytes = sum(p.numel() * p.element_size() for p in params)
                unit = _Unit(module, params, [p.data for p in params], nbytes)
                self._units.append(unit)
                self._unit_of.update(dict.fromkeys(params, unit))
                module.register_forward_pre_hook(self._before_forward(unit))
                module.register_forward_hook(self._after_forward(unit))
                for p in params:
                    p.register_post_accumulate_grad_hook(self._on_grad)
        for module in model.modules():  # buffers are small: they live on the device
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.device)
        if optimizer is not None:
            optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: self.release())
        self._forward, self._backward = _Pass(), _Pass()
        self._in_forward = False
        self.resident_bytes = self.peak_resident_bytes = 0

    # ------------------------------------------------------------------------------------------------
    # the passes

    def _start_forward(self) -> None:
        self.release()  # whatever the last backward left (unused parameters) goes home
        self._forward.restart()
        self._backward.restart()
        self._in_forward = True

    def _end_forward(self) -> None:
        self._in_forward = False

    def _before_forward(self, unit: _Unit):
        def hook(module, args):
            self._attach(unit, self._forward if self._in_forward else self._backward)
        return hook

    def _after_forward(self, unit: _Unit):
        def hook(module, args, output):
            if not self._in_forward:
                return  # recomputation in backward: the gradients are next, keep the weights
            outputs = [t for t in _tensors(output) if t.requires_grad]
            if torch.is_grad_enabled() and any(p.requires_grad for p in unit.params):
                if not outputs:
                    return  # nothing to hook backward on: stay on the device until the gradients come
                if len(outputs) == 1:
                    outputs[0].register_hook(lambda grad: self._attach(unit, self._backward))
                else:
                    torch.autograd.graph.register_multi_grad_hook(
                        outputs, lambda grad: self._attach(unit, self._backward), mode="any")
            self._detach(unit)
        return hook

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        unit = self._unit_of[param]
        if not unit.attached:
            raise RuntimeError("parameter streaming: a gradient arrived for a parameter that is not on the device")
        unit.waiting_grads -= 1
        if unit.waiting_grads <= 0:
            self._detach(unit)

    # ------------------------------------------------------------------------------------------------
    # attach, detach, prefetch

    def _attach(self, unit: _Unit, which: _Pass) -> None:
        which.current.append(unit)
        if not unit.attached:
            copies = self._take_prefetched(unit) or self._copy(unit)
            for p, copy in zip(unit.params, copies, strict=True):
                p.data = copy
            unit.attached = True
            self._count(unit.nbytes)
            unit.waiting_grads = len(unit.params)
        self._prefetch_after(unit, which)

    def _detach(self, unit: _Unit) -> None:
        if unit.attached:
            for p, home in zip(unit.params, unit.home, strict=True):
                p.data = home
            unit.attached = False
            self._count(-unit.nbytes)

    def _copy(self, unit: _Unit) -> list[torch.Tensor]:
        copies = [home.to(self.device, copy=True, non_blocking=True) for home in unit.home]
        if self._on_copy is not None:
            for copy in copies:
                self._on_copy(copy)
        return copies

    def _take_prefetched(self, unit: _Unit) -> list[torch.Tensor] | None:
        copies, unit.prefetched = unit.prefetched, None
        if copies is not None and self._stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(unit.event)
            for copy in copies:
                copy.record_stream(current)  # allocated on the side stream, used and freed on this one
        if copies is not None:
            self._count(-unit.nbytes)  # it moves from the prefetched to the attached bytes
        return copies

    def _prefetch_after(self, unit: _Unit, which: _Pass) -> None:
        position = which.previous.get(id(unit))
        if position is None:
            return
        budget = self.lookahead_bytes
        for upcoming in which.order[position + 1:]:
            if budget <= 0:
                break
            budget -= upcoming.nbytes
            if upcoming.attached or upcoming.prefetched is not None:
                continue
            if self._stream is None:
                upcoming.prefetched = self._copy(upcoming)
            else:
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._stream):
                    upcoming.prefetched = self._copy(upcoming)
                    upcoming.event = torch.cuda.Event()
                    upcoming.event.record(self._stream)
            self._count(upcoming.nbytes)

    def release(self) -> None:
        """Every unit back home, prefetched copies dropped: the host weights may change now."""
        if self._stream is not None:
            self._stream.synchronize()
        for unit in self._units:
            self._detach(unit)
            if unit.prefetched is not None:
                unit.prefetched = None
                self._count(-unit.nbytes)

    def _count(self, nbytes: int) -> None:
        self.resident_bytes += nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for t in output if isinstance(t, torch.Tensor)]
    return []
