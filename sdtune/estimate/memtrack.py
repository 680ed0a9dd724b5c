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
call per op, no fake tensors (PyTorch's own `mem_tracker` under FakeTensorMode took ~30x longer here).
"""

from __future__ import annotations

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
        out = func(*args, **(kwargs or {}))
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
