"""The host step overlapping the next forward (`OffloadAdamW.overlap_step`, the default on CUDA).

`step()` returns once the gradient norm is known; a worker thread steps the buckets in the order the last
forward used them, and each block of the model (cut as weight streaming cuts it) waits, before it runs,
only for the buckets holding its weights: a host event set by the worker, then the compute stream waits
on that bucket's upload. Backward, checkpoints and the masters wait for every queued step (`_settle`).
"""

from __future__ import annotations

import threading

import torch

from sdtune.offload.layout import Bucket, Scaling
from sdtune.offload.streams import blocking_event

GATE_BYTES = 128 * 2**20  # blocks of the model (as weight streaming cuts them) that wait for their buckets


class OverlapStep:
    """Mixed into `OffloadAdamW`: the gates, the queued steps, and waiting for them."""

    def _gate(self, model: torch.nn.Module) -> None:
        """Before each block of `model` runs, its buckets must have been stepped and uploaded."""
        from sdtune.offload.params import plan_units

        for module, params in plan_units(model, GATE_BYTES):
            buckets = list(dict.fromkeys(self._where[p][0] for p in params if p in self._where))
            if buckets:
                module.register_forward_pre_hook(lambda module, args, buckets=buckets: self._await(buckets))

    def _await(self, buckets: list[Bucket]) -> None:
        for bucket in buckets:
            ready = bucket.ready
            if ready is not None:
                ready.wait()
                bucket.ready = None
                self._order.append(bucket)
                if bucket.uploaded is not None:
                    torch.cuda.current_stream(self.device).wait_event(bucket.uploaded)

    def _settle(self) -> None:
        """Every step queued by `step()` is done and the compute stream waits for its uploads (before
        backward, checkpoints, or anything else that reads the masters, the state or the staging)."""
        stepping, self._stepping = self._stepping, []
        if not stepping:
            return
        errors = [future.exception() for future in stepping]
        for bucket in self._buckets:
            bucket.ready = None
        self._uploaded()
        for error in errors:
            if error is not None:
                raise error

    def _step_later(self, scaling: Scaling) -> None:
        """Queue each bucket's step on the worker, in the order the last forward used them; the next
        forward's blocks wait for theirs. The learning rate (and the EMA decay) is read now: the schedule
        changes it next."""
        group, order, self._order = self._step_settings(), self._order, []
        for bucket in list(dict.fromkeys([*order, *self._buckets])):
            bucket.ready, bucket.uploaded = threading.Event(), None
            self._stepping.append(self._worker.submit(self._step_queued, bucket, scaling, group))

    def _step_queued(self, bucket: Bucket, scaling: Scaling, group: dict) -> None:
        try:
            self._step_bucket(bucket, scaling, group)
            if self._upload_stream is not None:
                bucket.uploaded = blocking_event()
                bucket.uploaded.record(self._upload_stream)
        finally:  # on an error too: the forward goes on, and the error is raised by the next _settle
            bucket.ready.set()

    def _step_all(self, scaling: Scaling) -> None:
        for bucket in self._buckets:
            if not bucket.stepped:
                self._step_bucket(bucket, scaling)
