"""Several processes, one per GPU: who this process is, and the few collective calls a run makes.

    world = World.from_env()          # torchrun / accelerate launch set RANK, WORLD_SIZE, LOCAL_RANK
    rank = current_rank()             # the one source of "which process am I" (metrics, the CLI's lines)
    world.start(device="cuda")        # the process group: NCCL on GPUs, gloo on the CPU
    mine = world.share(items)         # this rank's slice of a global micro-batch
    loss = world.mean(loss)           # the same figure on every rank

A single process is a world of one: every method is then a no-op that costs nothing, so the loop calls
them unconditionally. torch.distributed does all the communicating; sdtune never opens a socket.

Batch k is the same images whatever the world size: the batch stream draws global micro-batches of
`train.batch_size x world size` images, and rank r trains on slots [r*b, (r+1)*b) of each. Every random
draw of a micro-batch (the VAE's sample, the noise, the timesteps) is made for the whole global batch on
every rank from the same seed and sliced the same way, so two processes of batch 1 see exactly what one
process of batch 2 sees.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env=None) -> World:
        """The world the launcher describes (torchrun and accelerate launch set the same variables); a plain
        `sdtune train` is a world of one."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return cls()
        return cls(rank=int(env.get("RANK", 0)), size=int(env["WORLD_SIZE"]),
                   local_rank=int(env.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the output folder, the metrics and the progress bar."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.size > 1

    def start(self, device: str) -> None:
        """Join the process group (once; the launcher's rendezvous variables say where), and take this
        rank's GPU: "cuda" then means cuda:LOCAL_RANK everywhere in this process."""
        import datetime

        import torch
        import torch.distributed as dist

        if not self.several or dist.is_initialized():
            return
        if device == "cuda":
            torch.cuda.set_device(self.local_rank)
        # a dead peer fails the next collective (gloo at once; NCCL after this timeout) instead of hanging
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))

    def stop(self) -> None:
        import torch.distributed as dist

        if self.several and dist.is_initialized():
            dist.destroy_process_group()

    def share(self, items: list) -> list:
        """This rank's slots of a global micro-batch (an equal share each)."""
        size = len(items) // self.size
        return items[self.rank * size:(self.rank + 1) * size]

    def slice(self, global_batch: int) -> slice:
        """The rows of a tensor drawn for the whole global micro-batch that belong to this rank."""
        size = global_batch // self.size
        return slice(self.rank * size, (self.rank + 1) * size)

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks (every rank gets it); NaN anywhere makes it NaN everywhere."""
        if not self.several:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor)
        return tensor.item() / self.size

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a signal that reached one rank stops them all)."""
        if not self.several:
            return flag
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([int(flag)], device=self._device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block first (a cold scan of the data fills the scan cache), then the others (who
        find it filled)."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def barrier(self) -> None:
        if self.several:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj) -> list | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        if not self.several:
            return [obj]
        import torch.distributed as dist

        gathered = [None] * self.size if self.main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def scatter(self, objs: list | None):
        """Rank r gets `objs[r]` from rank 0."""
        if not self.several:
            return objs[0]
        import torch.distributed as dist

        received = [None]
        dist.scatter_object_list(received, objs if self.main else None, src=0)
        return received[0]

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.several:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _device(self) -> str:
        import torch.distributed as dist

        return "cuda" if dist.get_backend() == "nccl" else "cpu"


def launched_rank(env=None) -> int | None:
    """This process's rank when a launcher started several, else None; without importing torch (the CLI's
    error lines)."""
    world = World.from_env(env)
    return world.rank if world.several else None


def current_rank() -> int:
    """This process's rank: torch.distributed's once a process group runs (it is the truth then), else the
    launcher's (`World.from_env`), without importing torch (metrics may be written before it is)."""
    torch = sys.modules.get("torch")  # not imported yet: then torch.distributed cannot be initialised either
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return World.from_env().rank
