"""Offload tiers: where fp32 master weights and optimizer state live when the GPU cannot hold them.

`memory.optimizer_offload = "cpu"` trains with `OffloadAdamW` (host RAM), `"nvme"` with `NvmeAdamW` (a
file under `memory.offload_dir`, streamed). `memory.param_offload = "cpu"` adds `ParamStreamer`: the
working weights stay in host memory and visit the device layer by layer. The engine is device-agnostic:
the compute device is whatever device the model's parameters are on, so the CPU test suite runs the same
code as a GPU run, with CUDA streams and events only where CUDA exists.
"""

from sdtune.offload.nvme import NvmeAdamW
from sdtune.offload.optimizer import OffloadAdamW
from sdtune.offload.params import ParamStreamer

__all__ = ["NvmeAdamW", "OffloadAdamW", "ParamStreamer"]
