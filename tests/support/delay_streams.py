"""Test-only seam for the GPU pre-flight (tests/gpu/test_async_equals_sync.py): GPU sleeps that make a missing
stream wait show, installed by tests/support/cli_runs.py's wrapper in the `sdtune train` it starts, never by
sdtune itself.

Every copy of the offload engine on a side stream (gradients to the host, uploads of stepped weights, the
streamed weights' fills) runs inside `with torch.cuda.stream(side):`. Each time such a block starts,
`torch.cuda._sleep(cycles)` is enqueued:

- `copies`: on the side stream, before its copies: every copy lands late, so a consumer that does not wait
  for it (the compute stream reading uploaded or filled weights, the host reading gradients) reads old bytes,
  and a host that rewrites a staging buffer without waiting overwrites what the upload has yet to read;
- `compute`: on the stream that was current before the block: every compute kernel queued after it runs
  late, so a side stream that does not wait for the compute stream copies a gradient before it is produced,
  or overwrites weights (a fill, an upload) before the kernels queued earlier have read them.

A race then changes the bits the run ends with, and the test compares them with `SDTUNE_OFFLOAD_SYNC=1`'s.
On a GPU that outruns Python (a small model) a race would otherwise hide behind the host's own slowness.
"""

from __future__ import annotations

import contextlib
import os

VARIABLE = "TEST_DELAY_STREAMS"  # "copies:CYCLES" or "compute:CYCLES"; unset or empty: no delay
COUNT = "TEST_DELAY_STREAMS_COUNT"  # a file that gets the number of sleeps at exit: the delays reached sdtune
MODES = ("copies", "compute")


def parse(value: str) -> tuple[str, int] | None:
    """("copies" | "compute", cycles) from the variable's value, None when it asks for nothing."""
    if not value:
        return None
    mode, _, cycles = value.partition(":")
    if mode not in MODES or not cycles.isdigit():
        raise ValueError(f"{VARIABLE}={value!r}: expected copies:CYCLES or compute:CYCLES")
    return mode, int(cycles)


def delayed(original, sleep, mode: str, cycles: int):
    """`torch.cuda.stream` (`original`) that calls `sleep(cycles)` on the side stream just inside each
    non-None stream block (copies) or on the current stream just before it (compute)."""

    @contextlib.contextmanager
    def stream(side):
        if side is None or not cycles:
            with original(side) as entered:
                yield entered
            return
        if mode == "compute":
            sleep(cycles)  # on the current stream: what the compute stream queues next runs late
        with original(side) as entered:
            if mode == "copies":
                sleep(cycles)  # on `side`, before the block's copies
            yield entered

    return stream


def install(environ=os.environ) -> tuple[str, int] | None:
    """Delay the side streams as the variable asks, where CUDA is (on the CPU there are no side streams), and
    count the sleeps into the file `TEST_DELAY_STREAMS_COUNT` names, at exit."""
    import atexit

    import torch

    asked = parse(environ.get(VARIABLE, ""))
    if asked is None or not torch.cuda.is_available():
        return None
    sleeps = [0]

    def sleep(cycles: int) -> None:
        sleeps[0] += 1
        torch.cuda._sleep(cycles)

    torch.cuda.stream = delayed(torch.cuda.stream, sleep, *asked)
    if environ.get(COUNT):
        atexit.register(lambda: open(environ[COUNT], "w").write(str(sleeps[0])))
    return asked
