"""CUDA streams and events of the offload engine, and the switch that makes every copy synchronous.

With `SDTUNE_OFFLOAD_SYNC=1` in the environment the engine creates no side streams: every copy runs on
the current stream and completes before the host reads it, as on the CPU. That is the reference against
which the GPU tests (`tests/gpu/test_async_equals_sync.py`) compare the asynchronous paths (equal masters,
bit for bit); a difference is a race.
"""

from __future__ import annotations

import os

import torch

SYNC_VARIABLE = "SDTUNE_OFFLOAD_SYNC"


def synchronous() -> bool:
    return os.environ.get(SYNC_VARIABLE, "") not in ("", "0")


def on_cuda(device) -> bool:
    """Whether the engine takes its CUDA branches on `device` (the stream tests' fake says yes on the CPU)."""
    return torch.device(device).type == "cuda"


def side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A new CUDA stream on `device`, or None where copies run in order anyway (CPU, meta, synchronous)."""
    if torch.device(device).type != "cuda" or synchronous():
        return None
    return torch.cuda.Stream(device)


def blocking_event() -> torch.cuda.Event:
    """An event whose `synchronize()` sleeps in the driver instead of spinning a core."""
    return torch.cuda.Event(blocking=True)
