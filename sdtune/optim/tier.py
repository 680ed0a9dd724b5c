"""The optimizer-tier interface: what the loop, the checkpoints and the estimator ask of any optimizer.

    tier = make_tier(unet.parameters(), cfg.train, plan, model=unet)
    tier.step(scaler, max_norm)          # unscale, clip, step; False when the step was skipped
    tier.master_weights(unet)            # the fp32 trained weights, wherever they live
    tier_class(plan).footprint(shapes, itemsize=2).host   # bytes, before anything is built

A tier owns one torch optimizer (`tier.optimizer`, what the LR schedule and GradScaler see) and says
where its fp32 master weights and optimizer state live: on the compute device (`Tier` itself: torch AdamW;
`AdamW8bit` with bitsandbytes' 8-bit moments; `Adafactor`, `Prodigy`, `Lion`: `sdtune.optim.in_device`, each of
them also steppable inside backward), in host RAM (`HostAdamW`, over `OffloadAdamW`) or in a file
(`NvmeTier`, over `NvmeAdamW`). Its `footprint` is the byte model the estimator counts, taken from the
same layout code the tier allocates by, so that the estimate follows the engine. Every tier implements
every method; the defaults here are the in-device ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from sdtune.config import TrainConfig
from sdtune.offload import layout

BNB_SMALL = 4096  # bitsandbytes keeps the state of tensors under this many values in fp32
BNB_BLOCK = 256   # ... and one fp32 scale per block of this many values of each 8-bit moment


@dataclass(frozen=True)
class Footprint:
    """Bytes a tier holds for its optimizer state and master weights, once built."""

    device: int  # on the compute device (besides the working weights and their gradients)
    host: int    # in host RAM (besides the model while it loads)
    disk: int    # in memory.offload_dir


class Tier:
    """AdamW with its fp32 masters and state on the compute device: gradients stay there, and the loop's
    GradScaler unscales them and `clip_gradients` clips them before the step."""

    name: ClassVar[str] = "adamw"
    host_gradients: ClassVar[bool] = False  # gradients leave for the host; the tier unscales, clips, checks
    step_copies: ClassVar[int] = 0  # fp32 temporaries of one parameter's size its step holds at once
    state_per_parameter: ClassVar[int] = 8  # bytes of optimizer state per element (`state_bytes`)
    state_per_tensor: ClassVar[int] = 4     # and per tensor (AdamW's fp32 step count)

    def __init__(self, optimizer: torch.optim.Optimizer, in_backward: bool = False):
        self.optimizer = optimizer
        self.in_backward = in_backward  # memory.fused_backward: `optimizer` is an `InBackward`
        self.grad_norm: float | None = None  # the last step's unscaled gradient norm, when one was taken

    @property
    def step_in_backward(self) -> bool:
        """Gradients reach the weights during backward: a NaN/Inf loss must skip backward itself."""
        return self.in_backward

    @classmethod
    def footprint(cls, shapes: list, *, itemsize: int, accumulation_steps: int = 1, host_weights: bool = False,
                  ema: bool = False) -> Footprint:
        """Bytes for the trained parameters of these `shapes` (torch.Size or tuples), on the device: the
        optimizer's state (`state_bytes`), its step's temporaries (`step_copies` of the largest parameter)
        and, with `ema`, the fp32 moving average of the weights (4 bytes a parameter)."""
        numels = _numels(shapes)
        device = cls.state_bytes(shapes) + 4 * cls.step_copies * max(numels, default=0)
        return Footprint(device=device + (4 * sum(numels) if ema else 0), host=0, disk=0)

    @classmethod
    def state_bytes(cls, shapes: list) -> int:
        """What the optimizer's state holds once it has stepped: `state_per_parameter` bytes an element and
        `state_per_tensor` a tensor (fused AdamW's fp32 exp_avg and exp_avg_sq, and an fp32 step count each;
        its kernel steps in place)."""
        return sum(cls.state_per_parameter * n + cls.state_per_tensor for n in _numels(shapes))

    def make_scaler(self, device: str, enabled: bool, **kwargs) -> torch.amp.GradScaler:
        """fp16 dynamic loss scaling (`enabled=False`: a pass-through) for this tier's gradients."""
        return torch.amp.GradScaler(device, enabled=enabled, **kwargs)

    def step(self, scaler: torch.amp.GradScaler, max_norm: float) -> bool:
        """Unscale, clip to `max_norm` (0: no clipping), step and update the scale; False when the step was
        skipped: fp16 overflow (the scaler skips it) or, without loss scaling, a NaN/Inf gradient norm.
        Stepped inside backward (no loss scaling, no clipping: the config refuses both), the weights are
        stepped and their gradients gone: only the scaler's state moves on, and there is no norm."""
        if self.in_backward:
            self.grad_norm = None
            self.optimizer.step()  # a no-op, which the LR schedule expects before its own step
            scaler.update()
            return True
        scaler.unscale_(self.optimizer)
        self.grad_norm = None
        if max_norm or not scaler.is_enabled():  # the norm, clipped or not, finds inf/NaN without loss scaling
            norm = clip_gradients(self.optimizer, max_norm)
            self.grad_norm = None if norm is None else norm.item()
            if self.grad_norm is not None and not scaler.is_enabled() and not math.isfinite(self.grad_norm):
                return False
        return _scaled_step(scaler, self.optimizer)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def master_weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """`module`'s weights with every trained parameter in fp32: its own state dict here."""
        return module.state_dict()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def save_files(self, folder: Path) -> None:
        """Write the state this tier keeps outside `state_dict` (the nvme tier's file) into `folder`."""

    def file_bytes(self) -> int:
        """Bytes `save_files` writes (a checkpoint checks the disk's free space against them first)."""
        return 0

    def load_files(self, folder: Path) -> None:
        """Read back what `save_files` wrote into `folder`."""

    @property
    def host_pinning(self) -> str | None:
        """How the tier's host buffers for GPU copies are page-locked (`PinnedBuffer.how`); None: it has none."""
        return None

    @property
    def host_wait_seconds(self) -> float:
        """Seconds the training thread has waited so far for the tier's host work (its worker's gradient
        copies and steps): a profiled step's `host_wait_seconds` (`sdtune.train.metrics.Phases`); none here."""
        return 0.0

    def restored_weights(self) -> dict[str, torch.Tensor]:
        """After `load_state_dict` and `load_files`: the fp32 trained weights they restored, by parameter name
        (the host tier's masters, which the checkpoint's weights file was written from); none here."""
        return {}

    def close(self) -> None:
        """Release threads and files (the nvme tier's state file) and the hooks that step inside backward;
        the tier is not used afterwards."""
        if self.in_backward:
            self.optimizer.remove_hooks()


class AdamW8bit(Tier):
    """bitsandbytes' AdamW8bit on the compute device: two uint8 moments with block scales."""

    name = "adamw8bit"

    @classmethod
    def state_bytes(cls, shapes) -> int:
        return sum(2 * n + 2 * 4 * -(-n // BNB_BLOCK) if n >= BNB_SMALL else 8 * n + 4 for n in _numels(shapes))


class Adafactor(Tier):
    """transformers' Adafactor without a first moment: the fp32 second moment factored, for a tensor of 2 or
    more dimensions, into a row (shape[:-1]) and a column (shape[:-2] + shape[-1:]) statistic, whole for
    1-D tensors; an fp32 RMS each (the step count is a Python int). Its step holds two temporaries of the
    parameter's size at once (the squared gradient and the update rebuilt from the factors)."""

    name = "adafactor"
    step_copies = 2

    @classmethod
    def state_bytes(cls, shapes) -> int:
        def moment(shape) -> int:
            if len(shape) < 2:
                return math.prod(shape)
            return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]

        return sum(4 * moment(s) + 4 for s in shapes)


class Prodigy(Tier):
    """prodigyopt's Prodigy: exp_avg, exp_avg_sq, its `s` and the initial weights `p0`, all fp32 and of the
    parameter's size (16 bytes a parameter; the step count and its D estimate are Python numbers). Its
    step holds one temporary of the parameter's size (p0 - p, then the denominator)."""

    name = "prodigy"
    step_copies = 1
    state_per_parameter, state_per_tensor = 16, 0


class Lion(Tier):
    """lion-pytorch's Lion: one fp32 moment (4 bytes a parameter). Its step holds two temporaries of the
    parameter's size at once (a copy of the moment and the interpolation whose sign is the update)."""

    name = "lion"
    step_copies = 2
    state_per_parameter, state_per_tensor = 4, 0


class HostAdamW(Tier):
    """`OffloadAdamW`: masters and moments in host RAM; gradients leave the device as backward makes them,
    and the tier unscales, clips and checks them itself, from the norm it took on the device."""

    name = "cpu"
    host_gradients = True

    @property
    def step_in_backward(self) -> bool:
        return self.optimizer.step_in_backward

    @classmethod
    def footprint(cls, shapes, *, itemsize, accumulation_steps=1, host_weights=False, ema=False) -> Footprint:
        """Buckets, staging and state in host RAM (or the file); with `ema`, the average beside them there."""
        numels = _numels(shapes)
        kw = dict(itemsize=itemsize, accumulation_steps=accumulation_steps, host_weights=host_weights)
        average = 4 * sum(numels) if ema else 0
        return Footprint(device=0, host=cls._host_bytes(numels, **kw) + average, disk=cls._disk_bytes(numels))

    @classmethod
    def _host_bytes(cls, numels, **kw) -> int:
        """The most it holds: built, or while it is built from the fp32 parameters."""
        return max(layout.host_bytes(numels, **kw), layout.host_bytes(numels, **kw, building=True))

    @classmethod
    def _disk_bytes(cls, numels) -> int:
        return 0

    def make_scaler(self, device, enabled, **kwargs):
        from sdtune.offload.scaler import HostGradScaler

        return HostGradScaler(device, enabled=enabled, **kwargs)

    def step(self, scaler, max_norm) -> bool:
        stepped = _scaled_step(scaler, self.optimizer) and not self.optimizer.skipped
        self.grad_norm = self.optimizer.last_grad_norm if stepped else math.inf
        return stepped

    def master_weights(self, module):
        return self.optimizer.master_weights(module)

    def state_dict(self) -> dict:
        """The param groups and step counts; the masters and moments are `save_files`' (a checkpoint's
        `optimizer_state.bin`), read back straight into the tier's buffers."""
        return self.optimizer.checkpoint_state()

    def save_files(self, folder):
        self.optimizer.save_state_files(folder)

    def file_bytes(self) -> int:
        return self.optimizer.state_file_bytes()

    def load_files(self, folder):
        self.optimizer.load_state_files(folder)

    def restored_weights(self):
        return self.optimizer.masters_by_name()

    @property
    def host_pinning(self):
        return self.optimizer.host_pinning

    @property
    def host_wait_seconds(self) -> float:
        return self.optimizer.host_wait_seconds

    def close(self):
        """The worker thread and the host buffers (`OffloadAdamW.close`); the nvme tier's state file too."""
        self.optimizer.close()


class NvmeTier(HostAdamW):
    """`NvmeAdamW`: masters and moments in a file under `memory.offload_dir`, streamed bucket by bucket
    through a ring of host buffers."""

    name = "nvme"

    @classmethod
    def _host_bytes(cls, numels, **kw) -> int:
        from sdtune.offload.nvme import NvmeAdamW

        return max(NvmeAdamW.host_bytes(numels, **kw), NvmeAdamW.host_bytes(numels, **kw, building=True))

    @classmethod
    def _disk_bytes(cls, numels) -> int:
        return layout.MASTER_BYTES * sum(numels)



IN_DEVICE = {tier.name: tier for tier in (Tier, AdamW8bit, Adafactor, Prodigy, Lion)}


def tier_class(plan) -> type[Tier]:
    """The tier a plan trains with (`memory.optimizer` and `memory.optimizer_offload`)."""
    if plan.distributed == "fsdp":  # torch AdamW on the shards; optimizer_offload=cpu is FSDP2's own CPU offload
        return Tier
    if plan.optimizer_offload == "nvme":
        return NvmeTier
    if plan.optimizer_offload == "cpu":
        return HostAdamW
    return IN_DEVICE[plan.optimizer]


def make_tier(params, train: TrainConfig, plan, model: torch.nn.Module | None = None,
              backward_passes: int = 1) -> Tier:
    """The plan's tier over the trainable `params`. `model`, the module that owns them, lets the host-RAM
    tier overlap its step with the next forward. `backward_passes`: backward calls per micro-batch (2 with
    prior preservation: the instance and the class half)."""
    params = [p for p in params if p.requires_grad]
    kind = tier_class(plan)
    if not kind.host_gradients:  # a torch optimizer on the device, or one per parameter stepped in backward
        from sdtune.optim.in_device import InBackward, build

        name = "adamw" if kind is Tier else kind.name
        if plan.fused_backward:
            return kind(InBackward(params, lambda group: build(name, group, train)), in_backward=True)
        return kind(build(name, params, train))
    from sdtune.offload import NvmeAdamW, OffloadAdamW

    accumulation = train.gradient_accumulation_steps * backward_passes
    kwargs = dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon,
                  weight_decay=train.weight_decay, device=plan.device, dtype=plan.working_dtype,
                  host_weights=plan.param_offload == "cpu", max_grad_norm=train.max_grad_norm,
                  accumulation_steps=accumulation, model=model,
                  ema=train.ema_decay > 0)  # the moving average is updated in the tier's host pass
    if kind is NvmeTier:
        return NvmeTier(NvmeAdamW(params, offload_dir=plan.offload_dir, **kwargs))
    # Each bucket can step as soon as its gradients are in, unless clipping, fp16 overflow checks or
    # accumulation need every gradient (of every micro-batch) first.
    eager = not train.max_grad_norm and not plan.loss_scaling and accumulation == 1
    return HostAdamW(OffloadAdamW(params, step_in_backward=eager, **kwargs))


def _numels(shapes: list) -> list[int]:
    return [math.prod(shape) for shape in shapes]


def _scaled_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """`scaler.step` and `scaler.update`; False when fp16 overflow made the scaler skip the step."""
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return not (scaler.is_enabled() and scaler.get_scale() < scale)


def clip_gradients(optimizer, max_norm: float):
    """Scale the gradients of `optimizer`'s parameters so that their global L2 norm is at most `max_norm`
    (0: only measure it); returns the norm before clipping, None without gradients.

    Unlike `torch.nn.utils.clip_grad_norm_`, the norm is accumulated in float64: the same gradients give
    the same factor however they are grouped into tensors, so offloaded flat buckets and per-parameter
    gradients are clipped identically (an fp32 sum over millions of elements differs by ~1e-5).
    FSDP2's sharded gradients (DTensors): each rank measures its shards and the squares are summed over
    the ranks."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    grads, sharded = _local_shards(grads)
    norms = [torch.linalg.vector_norm(g, dtype=torch.float64).to(grads[0].device) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms))
    if sharded:
        import torch.distributed as dist

        squared = total.square()
        dist.all_reduce(squared)
        total = squared.sqrt()
    if not max_norm:
        return total
    factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.to(g.device, g.dtype))
    return total


def _local_shards(grads: list) -> tuple[list, bool]:
    """Each gradient's local part: itself, or this rank's shard of a DTensor; and whether any was sharded."""
    if not torch.distributed.is_available():
        return grads, False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    if not any(isinstance(g, DTensor) for g in grads):
        return grads, False
    return [g.to_local() if isinstance(g, DTensor) else g for g in grads], True
