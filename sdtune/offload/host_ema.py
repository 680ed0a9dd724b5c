"""An offload tier's fp32 weights by name: its masters, and their moving average (`train.ema_decay` with
`optimizer_offload` cpu or nvme).

Each bucket keeps an fp32 copy in host RAM (`Bucket.ema`, 4 bytes a parameter; the nvme tier's too, beside
its file), updated chunk by chunk in the host pass that steps AdamW, right after a chunk of the master
changed and while it is still in the CPU's caches: the average costs no VRAM and no pass of its own.
`ema_decay` is the decay of the update made with the next step (None: no update), read when the step's
settings are (`_step_settings`), so that a step queued for later (`overlap_step`) or run inside backward
(`step_in_backward`) uses its own.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class HostEMA:
    """Mixed into `OffloadAdamW`: the masters by name; the average when built with `ema=True`."""

    ema_decay: float | None = None

    def master_weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """`module.state_dict()` with every offloaded parameter replaced by its fp32 master."""
        return {**module.state_dict(), **self._views(module, "master")}

    def _views(self, module: torch.nn.Module, part: str) -> dict[str, torch.Tensor]:
        """Each of `module`'s trained parameters' slice of its bucket's `part` ("master", "ema"), by name."""
        self._settle()
        views = {}
        for name, p in module.named_parameters():
            if p in self._where:
                bucket, offset, n = self._where[p]
                views[name] = getattr(bucket, part)[offset:offset + n].view(p.shape)
        return views

    def _step_settings(self) -> dict:
        """This step's learning rate and betas (the first param group) and its EMA decay."""
        return {**self.param_groups[0], "ema_decay": self.ema_decay}

    def ema_weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The moving average of each of `module`'s trained parameters, by name (views of the buckets)."""
        return self._views(module, "ema")

    @torch.no_grad()
    def load_ema(self, module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Copy `weights` (as `ema_weights` names them) into the buckets' averages."""
        for name, view in self.ema_weights(module).items():
            view.copy_(weights[name])

    @contextmanager
    @torch.no_grad()
    def ema_applied(self):
        """The working weights hold the moving average (cast), then exactly their own values again."""
        self._settle()
        self._drain_streams()
        kept = [bucket.device_flat.to("cpu", copy=True) for bucket in self._buckets]
        try:
            for bucket in self._buckets:
                bucket.device_flat.copy_(bucket.ema)
            yield
        finally:
            for bucket, own in zip(self._buckets, kept, strict=True):
                bucket.device_flat.copy_(own)
