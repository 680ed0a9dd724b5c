"""The host step overlapping the next forward (`OffloadAdamW.overlap_step`, the default on CUDA).

`step()` returns once the gradient norm is known; the tier's worker thread steps the buckets in the order the
last forward used them, and each block of the model (cut as weight streaming cuts it) waits, before it runs,
only for the buckets holding its weights: a host event set by the worker, then the compute stream waits on
that bucket's upload. Backward, checkpoints and the masters wait for every queued step (`StepQueue.settle`).

`StepQueue` is composed into the tier, not mixed in: it is handed what it works on (the buckets, the worker,
the step of one bucket, the upload stream) and owns only the queued steps and the forward's order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from sdtune.offload.layout import Bucket, Scaling
from sdtune.offload.streams import blocking_event

GATE_BYTES = 128 * 2**20  # blocks of the model (as weight streaming cuts them) that wait for their buckets


class StepQueue:
    """The buckets' steps queued by `OffloadAdamW.step()` on its worker, and the gates that make each block of
    `model` wait for its own. `step_bucket(bucket, scaling, group)` steps one bucket and queues its upload on
    `upload_stream`; `uploaded()` makes the compute stream wait for the queued uploads."""

    def __init__(self, model: torch.nn.Module, buckets: list[Bucket], where: dict, worker: ThreadPoolExecutor,
                 step_bucket: Callable[[Bucket, Scaling, dict], None], upload_stream, uploaded: Callable[[], None],
                 device: torch.device):
        self.buckets, self.worker, self.step_bucket = buckets, worker, step_bucket
        self.upload_stream, self.uploaded, self.device = upload_stream, uploaded, device
        self.stepping: list[Future] = []  # the buckets' steps queued by the last step()
        self.order: list[Bucket] = []     # buckets in the order the last forward used them
        self.waited = 0.0                 # seconds the training thread waited for queued steps
        self._gate(model, where)

    def _gate(self, model: torch.nn.Module, where: dict) -> None:
        """Before each block of `model` runs, its buckets must have been stepped and uploaded."""
        from sdtune.offload.params import plan_units

        for module, params in plan_units(model, GATE_BYTES):
            buckets = list(dict.fromkeys(where[p][0] for p in params if p in where))
            if buckets:
                module.register_forward_pre_hook(lambda module, args, buckets=buckets: self._await(buckets))

    def _await(self, buckets: list[Bucket]) -> None:
        for bucket in buckets:
            ready = bucket.ready
            if ready is not None:
                started = time.perf_counter()
                ready.wait()
                self.waited += time.perf_counter() - started
                bucket.ready = None
                self.order.append(bucket)
                if bucket.uploaded is not None:
                    torch.cuda.current_stream(self.device).wait_event(bucket.uploaded)

    def settle(self) -> None:
        """Every queued step is done and the compute stream waits for its uploads (before backward,
        checkpoints, or anything else that reads the masters, the state or the staging)."""
        stepping, self.stepping = self.stepping, []
        if not stepping:
            return
        started = time.perf_counter()
        errors = [future.exception() for future in stepping]
        self.waited += time.perf_counter() - started
        for bucket in self.buckets:
            bucket.ready = None
        self.uploaded()
        for error in errors:
            if error is not None:
                raise error

    def queue(self, scaling: Scaling, group: dict) -> None:
        """Queue each bucket's step on the worker, in the order the last forward used them; the next
        forward's blocks wait for theirs. `group` (the learning rate, the EMA decay) is this step's: the
        schedule changes it next."""
        order, self.order = self.order, []
        for bucket in list(dict.fromkeys([*order, *self.buckets])):
            bucket.ready, bucket.uploaded = threading.Event(), None
            self.stepping.append(self.worker.submit(self._step_queued, bucket, scaling, group))

    def _step_queued(self, bucket: Bucket, scaling: Scaling, group: dict) -> None:
        try:
            self.step_bucket(bucket, scaling, group)
            if self.upload_stream is not None:
                bucket.uploaded = blocking_event()
                bucket.uploaded.record(self.upload_stream)
        finally:  # on an error too: the forward goes on, and the error is raised by the next settle
            bucket.ready.set()
