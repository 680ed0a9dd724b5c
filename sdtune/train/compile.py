"""`memory.compile = "blocks"`: regional compilation of the UNet's repeated blocks, as PyTorch's recipe does
(https://docs.pytorch.org/tutorials/recipes/regional_compilation.html).

    compiled = compile_blocks(unet)    # last: after LoRA, checkpointing and the attention backend
    compiled.report()                  # after the first step: "compiled N blocks (K distinct) in X s"

diffusers' own switch does the compiling: `UNet2DConditionModel.compile_repeated_blocks` calls
`torch.compile` on every module of the classes its `_repeated_blocks` names (the transformer layers,
`BasicTransformerBlock`). Blocks of one shape share one compiled graph: SD1.5's 16 layers make a few graphs,
so the compile costs a few graphs' time instead of the whole UNet's. Compiling is lazy: the first forward
and backward of each new shape pay it (a new resolution bucket, sampling without gradients), later steps
reuse it. LoRA's peft layers inside a block compile with it.

The graphs are compiled for fixed shapes (`dynamic=False`): with dynamo's default, a second shape makes a
dynamic graph beside the static one, and gradient checkpointing's recomputation may then pick the other
graph than its forward did, which checkpointing refuses (pytorch/pytorch#166926; met here by a LoRA run
after others in one process). A graph a shape makes more of them, so dynamo's limit per function (8) is
raised to `RECOMPILE_LIMIT`, for the process. Not with weight streaming (the config refuses it): a
streamed unit inside a layer attaches its weights by hooks that swap `param.data`, which dynamo cannot
trace.

`BACKEND` is torch.compile's backend; the tests set "aot_eager" (the same graph capture and autograd
without inductor's C++ code generation, which takes a minute a graph on the CPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

BACKEND = "inductor"
RECOMPILE_LIMIT = 64


@dataclass
class CompiledBlocks:
    blocks: int          # modules compiled
    graphs_before: int   # dynamo's graph count and compile seconds when they were compiled
    seconds_before: float
    reported: bool = False

    def compiled(self) -> tuple[int, float]:
        """(graphs, seconds) dynamo compiled since `compile_blocks`: distinct block graphs and their time."""
        graphs, seconds = _dynamo_totals()
        return graphs - self.graphs_before, seconds - self.seconds_before

    def report(self) -> None:
        """Log what the first step compiled, once."""
        if not self.reported:
            self.reported = True
            graphs, seconds = self.compiled()
            logger.info(f"compiled {self.blocks} blocks ({graphs} distinct) in {seconds:.1f} s")


def compile_blocks(unet: torch.nn.Module) -> CompiledBlocks:
    """torch.compile each of the UNet's repeated blocks (diffusers' `compile_repeated_blocks`); returns what
    reports the compile once the first step has run it."""
    import torch._dynamo

    graphs, seconds = _dynamo_totals()
    # a graph per block shape (each resolution bucket, sampling): more than dynamo's default 8 a function
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    unet.compile_repeated_blocks(backend=BACKEND, dynamic=False)
    names = set(unet._repeated_blocks)
    blocks = sum(type(module).__name__ in names for module in unet.modules())
    return CompiledBlocks(blocks, graphs, seconds)


def _dynamo_totals() -> tuple[int, float]:
    """Dynamo's count of graphs compiled in this process and the seconds spent compiling frames."""
    from torch._dynamo.utils import calculate_time_spent, counters

    return counters["stats"]["unique_graphs"], calculate_time_spent().get("total_wall_time", 0.0)
