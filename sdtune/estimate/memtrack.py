"""Live memory by category: a dispatch mode that follows every storage created on one device type.

    tracker = MemoryTracker("meta")
    tracker.add(unet.parameters(), "weights")        # storages that exist before tracking starts
    with tracker:
        tracker.phase = "activations"
        loss = forward(...)
        tracker.phase = "temporaries"
        loss.backward()
    tracker.peak, tracker.at_peak                     # bytes, and {category: bytes} at that moment

Each storage an op creates is counted, under the tracker's current `phase`, from its creation until the
storage itself is freed (a weak reference to the storage object, which torch keeps alive exactly as long
as the storage). A storage can be relabelled (`relabel`), e.g. a gradient once AccumulateGrad made it
`param.grad`. The same tracker measures a real step on the CPU and a traced one on the meta device, so
the estimator is checked against reality with the same ruler. It is kept cheap on purpose: one Python
call per op, no fake tensors (PyTorch's own `mem_tracker` under FakeTensorMode took ~30x longer here),
and on the meta device the slowest kernels run once per signature (`SHAPE_ONLY_OPS`, below).
"""

from __future__ import annotations

import functools
import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class MemoryTracker(TorchDispatchMode):
    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type
        self.phase = "temporaries"
        self.current: dict[str, int] = defaultdict(int)
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self._live: dict[int, tuple[str, int, weakref.ref]] = {}  # storage id -> (category, bytes, ref)

    # ------------------------------------------------------------------------------------------------

    def add(self, tensors, category: str) -> None:
        """Count storages that already exist (weights, inputs) under `category`."""
        for t in tensors:
            self._track(t, category)

    def relabel(self, tensor: torch.Tensor, category: str) -> None:
        key = tensor.untyped_storage()._cdata
        if key not in self._live:
            self._track(tensor, category)
            return
        old, nbytes, ref = self._live[key]
        self.current[old] -= nbytes
        self.current[category] += nbytes
        self._live[key] = (category, nbytes, ref)

    def bytes_of(self, category: str) -> int:
        return self.current.get(category, 0)

    @property
    def total(self) -> int:
        return sum(self.current.values())

    # ------------------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.device_type == "meta" and func in _shape_only_ops():
            out = _remembered_call(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self._track(out, self.phase)
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, self.phase)
        return out

    def _track(self, t: torch.Tensor, category: str) -> None:
        if t.device.type != self.device_type:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = (category, nbytes, weakref.ref(storage, lambda _, key=key: self._free(key)))
        self.current[category] += nbytes
        total = self.total
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.current)

    def _free(self, key: int) -> None:
        category, nbytes, _ = self._live.pop(key)
        self.current[category] -= nbytes


# ---------------------------------------------------------------------------------------------------------
# On the meta device an op's outputs depend on its inputs' sizes, strides and dtypes and its other arguments
# alone. These ops' meta kernels are Python decompositions (torch._refs, torch._decomp) costing about a
# millisecond a call, most of a UNet trace's time, and a UNet calls them with the same shapes block after
# block: each signature runs the real kernel once, and its outputs' metadata makes the later calls' outputs
# (fresh tensors: none of these returns a view or writes an input). torch has no such cache for meta
# tensors (FakeTensorMode's op cache needs fake tensors, some 30x slower here; see the module docstring).
SHAPE_ONLY_OPS = ("native_group_norm.default", "native_group_norm_backward.default", "native_layer_norm.default",
                  "native_layer_norm_backward.default", "addmm.default", "add.Tensor", "mul.Tensor", "div.Tensor",
                  "sub.Tensor", "gelu.default", "gelu_backward.default", "silu.default", "silu_backward.default",
                  "sum.dim_IntList", "cat.default", "upsample_nearest2d.default",
                  "upsample_nearest2d_backward.default")
MEMO_ENTRIES = 50_000  # a plan's trace makes a few hundred
_OUTPUTS: dict[tuple, tuple | None] = {}  # (op, signature) -> its outputs' (size, stride, dtype); None: not memoised


class _Unmemoised(Exception):
    pass


@functools.cache
def _shape_only_ops() -> frozenset:
    """`SHAPE_ONLY_OPS` that this torch has, each checked against its schema: it writes no input and returns
    no view (a later torch that changes one is left to run its kernel)."""
    ops = set()
    for name in SHAPE_ONLY_OPS:
        packet, overload = name.split(".")
        try:
            op = getattr(getattr(torch.ops.aten, packet), overload)
        except AttributeError:  # not in this torch
            continue
        schema = op._schema
        if not schema.is_mutable and all(r.alias_info is None for r in schema.returns):  # fresh outputs only
            ops.add(op)
    return frozenset(ops)


def _signature(value):
    """What a meta op's outputs depend on: each tensor's metadata, every other argument by type and value."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta" or type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise _Unmemoised
        return (tuple(value.shape), value.stride(), value.dtype, value.storage_offset())
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_signature(v) for v in value))
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in sorted(value.items()))
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format)):
        return (type(value), value)
    raise _Unmemoised


def _remembered_call(func, args, kwargs):
    """`func(*args, **kwargs)` on meta tensors; outputs rebuilt from the metadata of its first call with
    the same signature."""
    try:  # the default dtype too: it types a float scalar's result on an integer tensor
        key = (func, _signature(args), _signature(kwargs), torch.get_default_dtype())
    except _Unmemoised:
        return func(*args, **kwargs)
    if key in _OUTPUTS:
        kept = _OUTPUTS[key]
        if kept is not None:
            made = [None if m is None else torch.empty_strided(m[0], m[1], dtype=m[2], device="meta") for m in kept]
            return made[0] if isinstance(kept, list) else tuple(made)
        return func(*args, **kwargs)
    out = func(*args, **kwargs)
    if len(_OUTPUTS) >= MEMO_ENTRIES:  # a long-lived process (every preset, many sizes) starts afresh
        _OUTPUTS.clear()
    _OUTPUTS[key] = _outputs_of(out)
    return out


def _outputs_of(out) -> list | tuple | None:
    """The metadata that rebuilds `out` (a tensor: a list of one; a tuple of tensors or None), or None when
    an output is not a whole fresh storage of its own (then the op always runs)."""
    single = isinstance(out, torch.Tensor)
    items = [out] if single else list(out) if isinstance(out, tuple) else None
    if items is None:
        return None
    kept, storages = [], set()
    for t in items:
        if t is None:
            kept.append(None)
            continue
        if not isinstance(t, torch.Tensor) or t.device.type != "meta" or t.storage_offset() != 0:
            return None
        fresh = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        storage = t.untyped_storage()
        if storage.nbytes() != fresh.untyped_storage().nbytes() or storage._cdata in storages:
            return None
        storages.add(storage._cdata)
        kept.append((tuple(t.shape), t.stride(), t.dtype))
    return kept if single else tuple(kept)
