"""Offload tiers: where fp32 master weights and optimizer state live when the GPU cannot hold them.

`memory.optimizer_offload = "cpu"` trains with `OffloadAdamW` (host RAM), `"nvme"` with `NvmeAdamW` (a
file under `memory.offload_dir`, streamed). `memory.param_offload = "cpu"` adds `ParamStreamer`: the
working weights stay in host memory and visit the device layer by layer. The engine is device-agnostic:
the compute device is whatever device the model's parameters are on, so the CPU test suite runs the same
code as a GPU run, with CUDA streams and events only where CUDA exists.

Why not a library: torchao's `CPUOffloadOptimizer` requires a CUDA (or XPU) device, keeps no fp32 masters
of half-precision weights, and steps inside backward, so it cannot clip gradients or skip fp16 overflows;
DeepSpeed's offload is an engine of its own. diffusers' group offloading (`enable_group_offload`) is built
for inference: its hooks move weights for forward only, so backward (and checkpointing's recomputation)
would find the saved weights back on the host, and its disk mode never writes updated weights back.
"""

from sdtune.offload.nvme import NvmeAdamW
from sdtune.offload.optimizer import OffloadAdamW
from sdtune.offload.params import ParamStreamer

__all__ = ["NvmeAdamW", "OffloadAdamW", "ParamStreamer"]
