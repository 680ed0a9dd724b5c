"""CUDA's stream and event semantics played on the CPU, as a race detector for the offload engine's waits.

    fake = FakeCuda()
    fake.install(monkeypatch)          # the engine's CUDA branches run on the CPU, with these streams
    with fake:
        ...                            # build the tier or the streamer with device=fake.device, train
    assert fake.violations == []

Every op runs at once, in program order, on the CPU; what the fake adds is the order CUDA would guarantee.
Each stream and each host thread carries a vector clock: an op on a stream comes after what that stream did
before, after what its issuing host thread knows to be done, and after what the stream waited for
(`wait_event`, `wait_stream`); the host learns what a stream did only through `synchronize()` (of an event or
a stream), a blocking copy or `.item()`; a worker thread learns what its submitter knew, and the submitter
what the task did when it reads the task's result. Every read and write of memory is checked against the
earlier accesses of the same bytes by other streams and threads: a pair not ordered by those clocks is a race,
recorded in `violations`, whichever order the ops ran in here. This checks every schedule CUDA may choose, not
one adversarial order: it is the happens-before analysis of PyTorch's CUDA sanitizer (`torch.cuda._sanitizer`),
written here because that one needs CUDA tensors. A device tensor freed while another stream than the one
that allocated it may still use it is a violation too, unless `record_stream` named that stream (CUDA's
caching allocator hands the block to the next allocation on its own stream at once).

Device memory is what the engine allocates with `device=fake.device` (`cpu:0`), what ops compute from it,
and tensors the fake first meets in an op (a model built before); host memory is what is allocated without
a device (`host_empty`, `torch.tensor`, `cpu`), or pinned (`pin_memory=True`). An unrecorded event is
no wait, as in CUDA. Written by hand: no library plays CUDA streams on the CPU.
"""

from __future__ import annotations

import functools
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_SYNCING = {torch.ops.aten._local_scalar_dense.default}  # .item(), bool(): the host waits for the stream


class Agent:
    """A stream or a host thread, with its vector clock: agent -> the last of its ops known to be done."""

    def __init__(self, name: str):
        self.name, self.clock = name, {}

    def tick(self) -> int:
        self.clock[self] = self.clock.get(self, 0) + 1
        return self.clock[self]

    def merge(self, clock: dict) -> None:
        for agent, seq in clock.items():
            if seq > self.clock.get(agent, 0):
                self.clock[agent] = seq

    def knows(self, agent: Agent, seq: int) -> bool:
        return agent is self or self.clock.get(agent, 0) >= seq

    def __repr__(self) -> str:
        return self.name


class FakeStream(Agent):
    def __init__(self, fake: FakeCuda, name: str):
        super().__init__(name)
        self.fake = fake

    def _issue(self) -> None:  # the host enqueues it: it comes after what the host knows
        self.merge(self.fake.host().clock)

    def wait_event(self, event: FakeEvent) -> None:
        with self.fake.lock:
            self._issue()
            if event.clock is not None:  # an event never recorded is no wait
                self.merge(event.clock)

    def wait_stream(self, stream: FakeStream) -> None:
        with self.fake.lock:
            self._issue()
            self.merge(stream.clock)

    def record_event(self, event: FakeEvent | None = None) -> FakeEvent:
        event = event or FakeEvent(self.fake)
        event.record(self)
        return event

    def synchronize(self) -> None:
        with self.fake.lock:
            self.fake.host().merge(self.clock)


class FakeEvent:
    def __init__(self, fake: FakeCuda):
        self.fake, self.clock = fake, None

    def record(self, stream: FakeStream | None = None) -> None:
        stream = stream or self.fake.current()
        with self.fake.lock:
            stream._issue()
            self.clock = dict(stream.clock)

    def wait(self, stream: FakeStream | None = None) -> None:
        (stream or self.fake.current()).wait_event(self)

    def synchronize(self) -> None:
        with self.fake.lock:
            if self.clock is not None:
                self.fake.host().merge(self.clock)

    def query(self) -> bool:
        return True


@dataclass(eq=False)
class _Memory:
    """One storage's accesses: (first byte, end, write, agent) -> (the agent's op number, what it was)."""

    host: bool
    home: Agent  # the stream that allocated it (device memory)
    accesses: dict = field(default_factory=dict)
    recorded: set = field(default_factory=set)  # streams named by `record_stream`


class _ThreadMode(TorchDispatchMode):
    """The fake's checks in a worker thread (a dispatch mode is entered per thread)."""

    def __init__(self, fake: FakeCuda):
        super().__init__()
        self.fake = fake

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.fake.dispatch(func, args, kwargs or {})


class FakeCuda(TorchDispatchMode):
    device = torch.device("cpu", 0)  # "device" memory: a CPU tensor, told apart from host memory by the index

    def __init__(self):
        super().__init__()
        self.lock = threading.RLock()
        self.compute = FakeStream(self, "compute")
        self.streams = [self.compute]
        self.violations: list[str] = []
        self._memory: dict[int, _Memory] = {}
        self._local = threading.local()

    # -- streams, events, threads ---------------------------------------------------------------

    def host(self) -> Agent:
        agent = getattr(self._local, "host", None)
        if agent is None:
            agent = self._local.host = Agent(f"host thread {threading.current_thread().name}")
        return agent

    def current(self) -> FakeStream:
        return getattr(self._local, "stream", None) or self.compute

    @contextmanager
    def use(self, stream: FakeStream | None):
        """`torch.cuda.stream(stream)`: the current stream of this thread (None: unchanged)."""
        previous = self.current()
        self._local.stream = stream or previous
        try:
            yield
        finally:
            self._local.stream = previous

    def new_stream(self, device=None) -> FakeStream:
        stream = FakeStream(self, f"side stream {len(self.streams)}")
        self.streams.append(stream)
        return stream

    def record_stream(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        with self.lock:
            if self.is_host(tensor):  # torch's own error type: aten::record_stream has no CPU kernel
                raise NotImplementedError("record_stream of a host tensor: CUDA tensors only")
            self._memory_of(tensor, host=False).recorded.add(stream)

    def install(self, monkeypatch) -> None:
        """The engine's CUDA branches on the CPU: its streams, events, worker thread and pinned buffers are
        the fake's (host buffers are pageable here)."""
        from sdtune.offload import optimizer, overlap, params
        from sdtune.offload.pinned import PinnedBuffer

        for module in (optimizer, params):  # a plain "cpu" device keeps the CPU branches: the reference run
            monkeypatch.setattr(module, "side_stream", lambda device: self.new_stream() if self.ours(device) else None)
        for module in (optimizer, overlap, params):
            monkeypatch.setattr(module, "blocking_event", lambda: FakeEvent(self))
        monkeypatch.setattr(optimizer, "on_cuda", self.ours)
        monkeypatch.setattr(optimizer, "PinnedBuffer", lambda numel, dtype, pin: PinnedBuffer(numel, dtype, pin=False))
        monkeypatch.setattr(optimizer, "ThreadPoolExecutor", functools.partial(_Worker, self))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current())
        monkeypatch.setattr(torch.cuda, "stream", self.use)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: self.record_stream(tensor, stream))

    def ours(self, device) -> bool:
        return torch.device(device) == self.device

    def active(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    def __enter__(self):
        self._local.depth = getattr(self._local, "depth", 0) + 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._local.depth -= 1
        return super().__exit__(*exc)

    def mark_host(self, *tensors: torch.Tensor) -> None:
        """These tensors (made before the fake saw them) are host memory."""
        with self.lock:
            for tensor in tensors:
                self._memory_of(tensor, host=True).host = True

    # -- memory -----------------------------------------------------------------------------------

    def _memory_of(self, tensor: torch.Tensor, host: bool) -> _Memory:
        storage = tensor.untyped_storage()
        key = storage._cdata
        memory = self._memory.get(key)
        if memory is None:
            memory = self._memory[key] = _Memory(host, self.current())
            weakref.finalize(storage, self._freed, key, memory)
        return memory

    def is_host(self, tensor: torch.Tensor) -> bool:
        memory = self._memory.get(tensor.untyped_storage()._cdata)
        return memory is not None and memory.host

    def _freed(self, key: int, memory: _Memory) -> None:
        with self.lock:
            if self._memory.get(key) is memory:
                del self._memory[key]
            if memory.host:
                return
            host = self.host()
            for (_, _, _, agent), (seq, what) in memory.accesses.items():
                if (isinstance(agent, FakeStream) and agent is not memory.home and agent not in memory.recorded
                        and not memory.home.knows(agent, seq) and not host.knows(agent, seq)):
                    self.violations.append(f"device memory freed while {agent} may still run {what} on it "
                                           f"(no record_stream): {memory.home} may reuse it at once")

    def _access(self, tensor: torch.Tensor, write: bool, agent: Agent, seq: int, what: str, host: bool) -> None:
        if tensor.numel() == 0:
            return
        memory = self._memory_of(tensor, host)
        size = tensor.element_size()
        lo = tensor.storage_offset() * size
        hi = lo + size * (1 + sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride(), strict=True)))
        for (plo, phi, pwrite, pagent), (pseq, pwhat) in list(memory.accesses.items()):
            if pagent is agent or phi <= lo or hi <= plo or not (write or pwrite):
                continue
            if not agent.knows(pagent, pseq):
                kind = "host" if memory.host else "device"
                self.violations.append(f"{what} on {agent} {'writes' if write else 'reads'} {kind} memory that "
                                       f"{pwhat} on {pagent} {'wrote' if pwrite else 'read'}, with no wait between")
            elif write and lo <= plo and phi <= hi:
                del memory.accesses[(plo, phi, pwrite, pagent)]  # ordered before this write: it stands for both
        memory.accesses[(lo, hi, write, agent)] = (seq, what)

    # -- ops --------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.dispatch(func, args, kwargs or {})

    def dispatch(self, func, args, kwargs):
        pinned = bool(kwargs.get("pin_memory"))
        if pinned:
            kwargs = {**kwargs, "pin_memory": False}
        with self.lock:
            if func is torch.ops.aten.lift_fresh.default:  # torch.tensor(...) without a device: host memory
                self._memory_of(args[0], host=True)
            reads, writes, aliased = _operands(func, args, kwargs)
            out = func(*args, **kwargs)
            fresh = [] if aliased else [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            self._check(func, args, kwargs, reads, writes, fresh, pinned)
        return out

    def _check(self, func, args, kwargs, reads, writes, fresh, pinned) -> None:
        operands = reads + writes
        if not operands and not fresh:
            return
        # Only a factory's device says where its result lives, and a copy's to `fake.device`: an op on tensors
        # (`.float()` too) names theirs, "cpu", so `.to("cpu")` is not told apart from it (no host wait assumed)
        device = kwargs.get("device")
        upload = func is torch.ops.aten._to_copy.default and device == self.device
        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            on_host = self.is_host(dst) and self.is_host(src)
            across = self.is_host(dst) != self.is_host(src)  # blocking, it ends with the stream's synchronisation
            syncs = across and not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        elif operands:
            on_host = all(self.is_host(t) for t in operands) and not upload
            syncs = func in _SYNCING
        else:
            on_host, syncs = device != self.device, False
        agent = self.host() if on_host else self.current()
        if not on_host:
            agent._issue()
        seq, what = agent.tick(), str(func).removeprefix("aten.")
        for t in reads:
            self._access(t, False, agent, seq, what, self.is_host(t))
        for t in writes:
            self._access(t, True, agent, seq, what, self.is_host(t))
        out_host = pinned or on_host
        for t in fresh:
            self._access(t, True, agent, seq, what, out_host)
        if syncs:  # a blocking copy, .item(): the host waits for the stream
            self.host().merge(agent.clock)


def _operands(func, args, kwargs) -> tuple[list, list, bool]:
    """(tensors read, tensors written, whether it returns an input or a view of one: no new memory; a view
    op touches no memory at all)."""
    schema = func._schema
    views = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
    reads, writes = [], []
    if views:
        return reads, writes, True
    for i, arg in enumerate(schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
        (writes if arg.alias_info is not None and arg.alias_info.is_write else reads).extend(tensors)
    returns_input = any(r.alias_info is not None for r in schema.returns)
    return reads, writes, returns_input


class _Worker(ThreadPoolExecutor):
    """The tier's worker thread under the fake: a task knows what its submitter knew, and whoever reads its
    result knows what it did."""

    def __init__(self, fake: FakeCuda, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fake = fake

    def submit(self, fn, /, *args, **kwargs):
        if not self.fake.active():  # the reference run's worker
            return super().submit(fn, *args, **kwargs)
        fake, known, done = self.fake, dict(self.fake.host().clock), {}

        def task():
            fake.host().merge(known)
            try:
                with _ThreadMode(fake):
                    return fn(*args, **kwargs)
            finally:
                done["clock"] = dict(fake.host().clock)
        return _Observed(super().submit(task), fake, done)


class _Observed:
    def __init__(self, future, fake: FakeCuda, done: dict):
        self.future, self.fake, self.done = future, fake, done

    def _learn(self) -> None:
        with self.fake.lock:
            self.fake.host().merge(self.done.get("clock", {}))

    def exception(self, timeout=None):
        error = self.future.exception(timeout)
        self._learn()
        return error

    def result(self, timeout=None):
        try:
            return self.future.result(timeout)
        finally:
            self._learn()

    def done(self) -> bool:
        return self.future.done()
