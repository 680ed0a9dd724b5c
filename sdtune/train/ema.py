"""Exponential moving average of the trained weights (`train.ema_decay`), kept where the tier keeps the fp32
masters: beside them on the device (4 bytes a parameter of VRAM), or in host RAM with an offload tier, which
updates it in the host pass of its step (`sdtune.offload.optimizer`).

    ema = make_ema(placement, cfg.train)   # None when train.ema_decay is 0
    ema.before_step(step)                  # before the backward of optimizer step `step` (1, 2, ...)
    ema.after_step(stepped)                # after it; skipped steps leave the average alone
    ema.weights()                          # {"unet.<name>": fp32 tensor}, what `ema.safetensors` holds
    with ema.applied(): ...                # the model runs with the averaged weights (sampling, export)

The decay follows diffusers' `EMAModel` with `use_ema_warmup`: the n-th update (n = 1, 2, ...) uses
min(ema_decay, 1 - (1 + (n - 1) / ema_inv_gamma) ** -ema_power), and 0 for the first, which starts the
average at the weights after its step. An update comes after every `train.ema_every`-th optimizer step.
Names are "<pipeline part>.<parameter>" (`unet.`, `text_encoder.`, as a LoRA's are), so one file holds
every trained part.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager

from sdtune.config import TrainConfig

EMA_FILE = "ema.safetensors"


def ema_decay(update: int, train: TrainConfig) -> float:
    """The decay of the `update`-th update (1-based)."""
    if update <= 1:
        return 0.0
    warm = 1.0 - (1.0 + (update - 1) / train.ema_inv_gamma) ** -train.ema_power
    return min(train.ema_decay, warm)


class EMA(ABC):
    """The schedule of updates: when, and with which decay; where the average lives is the subclass's."""

    def __init__(self, train: TrainConfig):
        self.train = train
        self.updates = 0       # updates made so far (checkpointed)
        self._due: float | None = None  # the decay of the update the current step makes, None: no update

    def before_step(self, step: int) -> None:
        due = step % self.train.ema_every == 0
        self._due = ema_decay(self.updates + 1, self.train) if due else None
        self._announce(self._due)

    def after_step(self, stepped: bool) -> None:
        if self._due is not None and stepped:
            self._update(self._due)
            self.updates += 1
        self._due = None
        self._announce(None)

    def _announce(self, decay: float | None) -> None:
        """Tell a tier that updates the average inside its own step which decay its next step uses (the
        in-device kind has no such tier: nothing to tell)."""
        return None

    def _update(self, decay: float) -> None:
        """Update the average after a step (the in-device kind; an offload tier has done it in its step)."""
        return None

    @abstractmethod
    def weights(self) -> dict:
        """The average as {"<pipeline part>.<parameter>": fp32 tensor}."""

    @abstractmethod
    def load(self, weights: dict) -> None:
        """Copy `weights` (as `weights()` names them) into the average."""

    @abstractmethod
    def applied(self):
        """A context in which the model's working weights hold the average, and their own values after."""


class DeviceEMA(EMA):
    """An fp32 copy of each trained parameter, on its device, lerped towards it after each due step."""

    def __init__(self, train: TrainConfig, params: dict):
        import torch

        super().__init__(train)
        self.params = params
        with torch.no_grad():
            self.average = {name: p.detach().clone() for name, p in params.items()}

    def _update(self, decay: float) -> None:
        import torch

        with torch.no_grad():
            for name, p in self.params.items():
                self.average[name].lerp_(p.detach(), 1.0 - decay)

    def weights(self) -> dict:
        return dict(self.average)

    def load(self, weights: dict) -> None:
        import torch

        with torch.no_grad():
            for name, average in self.average.items():
                average.copy_(weights[name])

    @contextmanager
    def applied(self):
        """Swap the averages in as the parameters' data (no copy), and back."""
        own = {name: p.data for name, p in self.params.items()}
        try:
            for name, p in self.params.items():
                p.data = self.average[name]
            yield
        finally:
            for name, p in self.params.items():
                p.data = own[name]


class HostEMA(EMA):
    """The average of an offload tier's buckets (`OffloadAdamW(ema=True)`), of the UNet's parameters."""

    def __init__(self, train: TrainConfig, optimizer, unet):
        super().__init__(train)
        self.optimizer, self.unet = optimizer, unet

    def _announce(self, decay: float | None) -> None:
        self.optimizer.ema_decay = decay

    def weights(self) -> dict:
        return {f"unet.{name}": w for name, w in self.optimizer.ema_weights(self.unet).items()}

    def load(self, weights: dict) -> None:
        self.optimizer.load_ema(self.unet, {name.removeprefix("unet."): w for name, w in weights.items()})

    def applied(self):
        return self.optimizer.ema_applied()


def make_ema(placement, train: TrainConfig) -> EMA | None:
    """The moving average of what `placement` trains, where its tier keeps the masters; None when off."""
    if not train.ema_decay:
        return None
    if placement.tier.host_gradients:
        return HostEMA(train, placement.tier.optimizer, placement.unet)
    return DeviceEMA(train, placement.trained_params())
