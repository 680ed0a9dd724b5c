"""Parameter streaming (`param_offload = "cpu"`): the UNet's working weights live in host memory and visit
the compute device block by block, so the GPU holds a few blocks' weights instead of the whole UNet's.

    streamer = ParamStreamer(unet, "cuda", optimizer, prefetch_blocks=2)  # OffloadAdamW(host_weights=True)

Units are blocks: from the root down, the largest called module (not a ModuleList/ModuleDict) whose
weights fit in `block_bytes`; a bigger one is split into its children, and what it owns itself is a unit
too (SD1.5 in fp16: 34 units of at most 119 MiB, not 391 layers). A unit is attached (each `param.data` a
view into a device buffer, as FSDP does) for its forward and detached after it. Gradient checkpointing is
required: checkpointed blocks keep no weights for backward and recompute there. A hook on a unit's outputs
attaches it before its gradients are computed; it is detached once all its parameters have theirs. A LoRA
streams only the frozen base (`select`): its adapters stay on the device, and a frozen unit, which gets no
gradients of its own, is detached once the gradients of its inputs and of the adapters inside it are all
computed. What autograd saves of an attached weight outside checkpointed code (a Linear's `weight.t()`) is
saved as a reference to the unit and read from wherever the unit is attached when backward needs it.

The device holds a pool of `prefetch_blocks + 1` flat buffers the size of the largest unit (more only if
more units are attached at once). Copies run on their own CUDA stream, `prefetch_blocks` units ahead of the
one computing, in the order the previous step's forward and backward attached them; a first use or one out
of that order is copied on the spot. A buffer is refilled after an event the compute stream recorded when
its last unit was detached, and read after its copy's event. The optimizer changes the host weights in its
step: a step pre-hook sends every unit home and drops what was prefetched first. On the CPU, the meta device
(where the estimator counts the pool through `on_copy`) and with `SDTUNE_OFFLOAD_SYNC=1`, copies are
synchronous and the results bit-identical.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from sdtune.offload.streams import blocking_event, side_stream

ALIGN = 64  # bytes: every run of parameters starts aligned in a buffer, so any dtype may view it
_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.ParameterList, torch.nn.ParameterDict)


def plan_units(model: torch.nn.Module, block_bytes: int, select=None) -> list[tuple[torch.nn.Module, list]]:
    """(module whose forward attaches them, parameters) for each unit of `model`, in module order; only the
    parameters `select(param)` accepts (None: all) are streamed."""
    units = []

    def chosen(params) -> list:
        return [p for p in params if select is None or select(p)]

    def visit(module: torch.nn.Module, called: bool) -> list:  # returns parameters still without a unit
        params = chosen(module.parameters())
        below = any(True for child in module.children() for _ in chosen(child.parameters()))
        if called and params and (_nbytes(params) <= block_bytes or not below):
            units.append((module, params))
            return []
        stray = chosen(module.parameters(recurse=False))
        for child in module.children():
            stray += visit(child, not isinstance(child, _CONTAINERS))
        if called and stray:
            units.append((module, stray))
            return []
        return stray

    visit(model, True)
    return units


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(eq=False)
class _Buffer:
    flat: torch.Tensor                       # uint8 on the device
    filled: object = None                    # CUDA event: the last copy into it is complete
    released: object = None                  # CUDA event: the compute stream is done with its last unit
    unit: _Unit | None = None


@dataclass(eq=False)
class _Unit:
    params: list[torch.nn.Parameter]
    home: list[torch.Tensor]                 # the host tensors the parameters return to
    offsets: list[int]                       # each parameter's byte offset in a buffer
    runs: list[tuple[torch.Tensor, int]]     # (host tensor, byte offset): one copy each
    nbytes: int                              # of the parameters
    extent: int                              # of their layout in a buffer
    trainable: int
    resident: list = field(default_factory=list)  # trainable parameters of its module that are not streamed
    buffer: _Buffer | None = None            # attached, or prefetched when not attached
    attached: bool = False
    waiting_grads: int = 0                   # parameters still to receive a gradient in this backward
    inputs: tuple = ()                       # a frozen unit's inputs that require grad, during its forward


def _layout(params: list) -> tuple[list, list[int], list, int]:
    """Byte offsets in a buffer, and the copies that fill it: host parameters adjacent in one storage (the
    optimizer's flat buckets) merge into one run, so a block is a copy or two instead of one per tensor."""
    home, offsets, runs, end = [p.data for p in params], [], [], 0
    for h in home:
        if runs and _adjacent(runs[-1][0], h):
            run, start = runs[-1]
            offsets.append(start + _nbytes([run]))
            runs[-1] = (run.as_strided((run.numel() + h.numel(),), (1,), run.storage_offset()), start)
        else:
            offsets.append(_align(end))
            runs.append((h, offsets[-1]))
        end = offsets[-1] + _nbytes([h])
    return home, offsets, runs, end


def _adjacent(run: torch.Tensor, h: torch.Tensor) -> bool:
    return (h.device.type == "cpu" and run.is_contiguous() and h.is_contiguous() and run.dtype == h.dtype
            and run.untyped_storage().data_ptr() == h.untyped_storage().data_ptr()
            and run.data_ptr() + _nbytes([run]) == h.data_ptr())


def _view(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    return flat[offset:offset + _nbytes([like])].view(like.dtype).view(like.shape)


@dataclass
class _Pass:
    """Units in the order one kind of pass (forward or backward) attached them, last step and this one."""

    order: list[_Unit] = field(default_factory=list)
    first: dict[_Unit, int] = field(default_factory=dict)
    current: list[_Unit] = field(default_factory=list)
    cursor: int = -1

    def restart(self) -> None:
        if self.current:
            self.order, self.current = self.current, []
            self.first = {unit: i for i, unit in reversed(list(enumerate(self.order)))}
        self.cursor = -1

    def after(self, unit: _Unit | None) -> list[_Unit]:
        """What followed `unit` last time (nothing if it was not there); None: the start of the pass."""
        if unit is None:
            return self.order
        i = self.cursor + 1
        if i >= len(self.order) or self.order[i] is not unit:
            i = self.first.get(unit)
            if i is None:
                return []
        self.cursor = i
        return self.order[i + 1:]


class ParamStreamer:
    """Streams `model`'s parameters (which must already live on the host) to `device` block by block."""

    def __init__(self, model: torch.nn.Module, device, optimizer=None, *, block_bytes: int = 128 * 2**20,
                 prefetch_blocks: int = 2, on_copy=None, select=None):
        if prefetch_blocks < 0:
            raise ValueError(f"prefetch_blocks must be 0 or more, got {prefetch_blocks}")
        self.device, self.prefetch_blocks = torch.device(device), prefetch_blocks
        self._on_copy = on_copy  # called with each pool buffer allocated (the estimator counts them as weights)
        self._stream = side_stream(self.device)
        self._watches: list = []  # frozen units' backward hooks of this step
        self.units = [self._make_unit(module, params) for module, params in plan_units(model, block_bytes, select)]
        self._unit_of = {p: u for u in self.units for p in u.params}
        if len(self._unit_of) != sum(len(u.params) for u in self.units):
            raise ValueError("parameter streaming needs every parameter in one block; this model shares some")
        self._buffer_bytes = _align(max((u.extent for u in self.units), default=0))
        self._pool: list[_Buffer] = []
        self._buffer_of: dict[int, _Buffer] = {}  # storage id -> pool buffer
        self._ahead: list[_Unit] = []             # the units predicted next: kept when detached
        for module in model.modules():  # buffers are small: they live on the device
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.device)
        if optimizer is not None:
            optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: self.release())
        model.register_forward_pre_hook(lambda module, args: self._start_forward(), prepend=True)
        model.register_forward_hook(lambda module, args, output: self._end_forward(), always_call=True)
        self._forward, self._backward = _Pass(), _Pass()
        self._in_forward, self._saving = False, None
        self.resident_bytes = self.peak_resident_bytes = self.pool_bytes = 0
        self.spot_copies = 0  # units copied when needed, not ahead: first uses and mispredictions

    def _make_unit(self, module: torch.nn.Module, params: list) -> _Unit:
        home, offsets, runs, extent = _layout(params)
        streamed = set(params)
        unit = _Unit(params, home, offsets, runs, _nbytes(params), extent, sum(p.requires_grad for p in params),
                     resident=[p for p in module.parameters() if p.requires_grad and p not in streamed])
        module.register_forward_pre_hook(lambda module, args, kwargs: self._before_forward(unit, args, kwargs),
                                         with_kwargs=True)
        module.register_forward_hook(lambda module, args, output: self._after_forward(unit, output))
        for p in params:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._on_grad)
        return unit

    def _start_forward(self) -> None:
        self.release()  # whatever the last backward left (unused parameters) goes home
        for handle in self._watches:  # a backward that never ran (an error) leaves no hook behind
            handle.remove()
        self._watches.clear()
        self._forward.restart()
        self._backward.restart()
        self._in_forward = True
        self._prefetch(self._predict(None, self._forward))
        if torch.is_grad_enabled():
            self._saving = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._saving.__enter__()

    def _end_forward(self) -> None:
        self._in_forward = False
        if self._saving is not None:
            self._saving.__exit__(None, None, None)
            self._saving = None

    def _pass(self) -> _Pass:
        return self._forward if self._in_forward else self._backward  # a forward in backward: recomputation

    def _before_forward(self, unit: _Unit, args, kwargs):
        """Attach the unit. A frozen one's inputs that need a gradient are passed on as views of their own:
        an input another unit reads too (the text context every cross-attention takes) would have its whole
        gradient only after the last of them, the view's is complete when this unit's backward is done."""
        self._attach(unit, self._pass())
        if unit.trainable or not torch.is_grad_enabled():
            return None
        flat, spec = tree_flatten((args, kwargs))
        flat = [t.view_as(t) if isinstance(t, torch.Tensor) and t.requires_grad else t for t in flat]
        if self._in_forward:  # (the recomputation in backward makes the same views, and no hooks)
            unit.inputs = tuple(t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad)
        return tree_unflatten(flat, spec)

    def _after_forward(self, unit: _Unit, output) -> None:
        inputs, unit.inputs = unit.inputs, ()
        if not self._in_forward:
            return  # recomputation in backward: the gradients are next, keep the weights
        if torch.is_grad_enabled():
            outputs = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            if not outputs and unit.trainable:
                return  # nothing to hook backward on: stay on the device until the gradients come
            if outputs:
                torch.autograd.graph.register_multi_grad_hook(
                    outputs, lambda grads: self._attach(unit, self._backward), mode="any")
                if not unit.trainable:
                    self._detach_after_backward(unit, [*inputs, *unit.resident])
        self._detach(unit)

    def _detach_after_backward(self, unit: _Unit, watched: list) -> None:
        """A frozen unit gets no gradients of its own: backward is done with it once the gradients of its
        inputs and of the trainable parameters inside it (a LoRA's) are all computed."""
        if watched:  # (else nothing in it needs a gradient: the next forward or step sends it home)
            self._watches.append(torch.autograd.graph.register_multi_grad_hook(
                watched, lambda grads: self._detach(unit), mode="all"))  # removed by the next forward

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        unit = self._unit_of[param]
        if not unit.attached:
            raise RuntimeError("parameter streaming: a gradient arrived for a parameter that is not on the device")
        unit.waiting_grads -= 1
        if unit.waiting_grads <= 0:
            self._detach(unit)

    def _pack(self, tensor: torch.Tensor):
        buffer = self._buffer_of.get(tensor.untyped_storage()._cdata)
        if buffer is None or buffer.unit is None:
            return tensor
        return buffer.unit, tensor.dtype, tensor.size(), tensor.stride(), tensor.storage_offset()

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        unit, dtype, size, stride, offset = packed
        self._attach(unit, self._backward)
        return unit.buffer.flat.view(dtype).as_strided(size, stride, offset)

    def _attach(self, unit: _Unit, which: _Pass) -> None:
        if unit.attached:
            return
        which.current.append(unit)
        if unit.buffer is None:
            self.spot_copies += 1
            self._fill(unit, self._take(required=True))
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_event(unit.buffer.filled)
        for p, offset in zip(unit.params, unit.offsets, strict=True):
            p.data = _view(unit.buffer.flat, offset, p)
        unit.attached, unit.waiting_grads = True, unit.trainable
        self._prefetch(self._predict(unit, which))

    def _detach(self, unit: _Unit) -> None:
        if not unit.attached:
            return
        for p, home in zip(unit.params, unit.home, strict=True):
            p.data = home
        unit.attached = False
        if self._stream is not None:
            unit.buffer.released.record(torch.cuda.current_stream(self.device))
        if unit not in self._ahead:
            self._free(unit.buffer)

    def _predict(self, unit: _Unit | None, which: _Pass) -> list[_Unit]:
        """The next `prefetch_blocks` units after `unit`; a forward that backward follows runs into it."""
        upcoming = which.after(unit)
        if which is self._forward and torch.is_grad_enabled():
            upcoming = itertools.chain(upcoming, self._backward.order)
        ahead = []
        for u in upcoming:
            if len(ahead) == self.prefetch_blocks:
                break
            if u not in ahead:
                ahead.append(u)
        return ahead

    def _prefetch(self, ahead: list[_Unit]) -> None:
        self._ahead = ahead
        for buffer in self._pool:  # a prefetch no longer predicted gives its buffer back
            if buffer.unit is not None and not buffer.unit.attached and buffer.unit not in ahead:
                self._free(buffer)
        for unit in ahead:
            if unit.buffer is None:
                buffer = self._take(required=False)
                if buffer is None:
                    return
                self._fill(unit, buffer)

    def _take(self, required: bool) -> _Buffer | None:
        """A free buffer; for a unit needed now, a prefetched one, or a new one when every one is attached."""
        while len(self._pool) <= self.prefetch_blocks:  # all at once: what the first step holds, the next ones do
            self._allocate()
        free = next((b for b in self._pool if b.unit is None), None)
        if free is not None or not required:
            return free
        prefetched = [b for b in self._pool if not b.unit.attached]
        if not prefetched:
            return self._allocate()
        victim = max(prefetched, key=lambda b: self._ahead.index(b.unit) if b.unit in self._ahead else 1 << 30)
        self._free(victim)
        return victim

    def _allocate(self) -> _Buffer:
        flat = torch.empty(self._buffer_bytes, dtype=torch.uint8, device=self.device)
        if self._stream is not None:  # once, for when the pool is freed: copies may still be writing it
            flat.record_stream(self._stream)
        if self._on_copy is not None:
            self._on_copy(flat)
        events = (blocking_event(), blocking_event()) if self._stream is not None else ()
        if events:  # the block may have been freed by compute kernels still running: the first fill waits too
            events[1].record(torch.cuda.current_stream(self.device))
        buffer = _Buffer(flat, *events)
        self._pool.append(buffer)
        self._buffer_of[flat.untyped_storage()._cdata] = buffer
        self.pool_bytes += self._buffer_bytes
        return buffer

    def _fill(self, unit: _Unit, buffer: _Buffer) -> None:
        buffer.unit, unit.buffer = unit, buffer
        self._count(unit.nbytes)
        if self._stream is None:
            self._copy(unit, buffer.flat)
            return
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(buffer.released)  # not the whole compute stream: only its last reader
            self._copy(unit, buffer.flat)
            buffer.filled.record(self._stream)

    def _copy(self, unit: _Unit, flat: torch.Tensor) -> None:
        for host, offset in unit.runs:  # synchronous without a copy stream: the host may rewrite it next
            _view(flat, offset, host).copy_(host, non_blocking=self._stream is not None)

    def _free(self, buffer: _Buffer) -> None:
        unit, buffer.unit = buffer.unit, None
        unit.buffer = None
        self._count(-unit.nbytes)

    def release(self) -> None:
        """Every unit back home, prefetched copies dropped: the host weights may change now. No wait: a copy
        still running fills a buffer given up here, which the copy stream fills again before any use."""
        self._ahead = []
        for unit in self.units:
            self._detach(unit)
        for buffer in self._pool:
            if buffer.unit is not None:
                self._free(buffer)

    def _count(self, nbytes: int) -> None:
        self.resident_bytes += nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
