"""Offload tiers: where fp32 master weights and optimizer state live when the GPU cannot hold them.

`memory.optimizer_offload = "cpu"` trains with `OffloadAdamW` (host RAM). The engine is device-agnostic:
the compute device is whatever device the model's parameters are on, so the CPU test suite runs the same
code as a GPU run, with CUDA streams and events only where CUDA exists.
"""

from sdtune.offload.optimizer import OffloadAdamW

__all__ = ["OffloadAdamW"]
