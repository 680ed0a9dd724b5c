"""The torch optimizers of the in-device tiers (`memory.optimizer`), and stepping them inside backward.

    optimizer = build("lion", params, cfg.train)          # lion-pytorch's Lion over `params`
    optimizer = InBackward(params, lambda group: build("adafactor", group, cfg.train))   # memory.fused_backward

- `adamw`: torch's AdamW (fused kernel; foreach where the fused one is missing).
- `adamw8bit`: bitsandbytes' AdamW8bit (the `sdtune[adamw8bit]` extra).
- `adafactor`: transformers' Adafactor with the settings of kohya's SDXL recipe (`scale_parameter=False,
  relative_step=False, warmup_init=False`: the LR schedule sets the rate), no first moment (`beta1=None`),
  its factored second moment.
- `prodigy`: prodigyopt's Prodigy, with the settings its README gives for diffusion models (`decouple=True`,
  `use_bias_correction=True`, `safeguard_warmup=True`); learning_rate 1.0 (it finds the step size itself).
- `lion`: lion-pytorch's Lion (one moment; the update's sign, so a 3-10x lower learning rate than AdamW's).

Hyper-parameters come from the `[train]` keys: learning_rate, adam_beta1/adam_beta2 (Prodigy's and Lion's
betas), adam_epsilon (AdamW's and Prodigy's), weight_decay. A package that is missing is one line naming
its extra. `InBackward` (kohya's `fused_backward_pass`, OneTrainer's fused back pass) gives each parameter
its own optimizer and steps it from the parameter's post-accumulate-grad hook, then frees the gradient: no
gradients of the whole model exist at once. That is exact for optimizers that step each tensor on its own
(all but Prodigy, whose step size comes from every weight at once: the config refuses that pair).
Stepping inside backward needs torch >= 2.1 (`register_post_accumulate_grad_hook`).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

import torch

from sdtune.config import TrainConfig
from sdtune.errors import SdtuneError
from sdtune.util.libraries import import_optimizer_package


def build(name: str, params, train: TrainConfig) -> torch.optim.Optimizer:
    """The `memory.optimizer` named `name` over `params` (parameters or param groups)."""
    betas, lr, decay = (train.adam_beta1, train.adam_beta2), train.learning_rate, train.weight_decay
    if name == "adafactor":  # kohya's SDXL recipe: a fixed rate the LR schedule sets; beta1=None: no first moment
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=decay)
    if name == "prodigy":
        # prodigyopt's README, "Diffusion models": safeguard_warmup=True (the warm-up or a decaying rate must
        # not shrink its estimate of the step size), use_bias_correction=True and weight_decay=0.01 (the
        # default train.weight_decay); decouple=True is AdamW's decoupled decay.
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line about its weight decay
            return import_optimizer_package(name).Prodigy(
                params, lr=lr, betas=betas, eps=train.adam_epsilon, weight_decay=decay, decouple=True,
                use_bias_correction=True, safeguard_warmup=True)
    if name == "lion":
        return import_optimizer_package(name).Lion(params, lr=lr, betas=betas, weight_decay=decay)
    kwargs = dict(lr=lr, betas=betas, eps=train.adam_epsilon, weight_decay=decay)
    if name == "adamw8bit":
        return import_optimizer_package(name).optim.AdamW8bit(params, **kwargs)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # fused needs a recent torch for the CPU; foreach works everywhere
        return torch.optim.AdamW(params, foreach=True, **kwargs)


class InBackward(torch.optim.Optimizer):
    """One optimizer per parameter (made by `make([param])`), stepped as soon as backward has made that
    parameter's gradient, which is freed right after. `param_groups` are the inner optimizers' own group
    dicts, so the LR schedule's changes reach them; `step()` has nothing left to do. `remove_hooks()` when
    the model outlives it (a rebuilt tier must not step the weights a second time)."""

    def __init__(self, params, make: Callable[[list], torch.optim.Optimizer]):
        params = [p for p in params if p.requires_grad]
        inner = [make([p]) for p in params]
        super().__init__(params, dict(inner[0].defaults))
        self.inner = inner
        self.param_groups = [group for optimizer in inner for group in optimizer.param_groups]
        self._hooks = [p.register_post_accumulate_grad_hook(lambda p, optimizer=optimizer: self._step_one(p, optimizer))
                       for p, optimizer in zip(params, self.inner, strict=True)]

    @staticmethod
    @torch.no_grad()
    def _step_one(p: torch.nn.Parameter, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()
        p.grad = None

    def step(self, closure=None):
        """Every parameter was stepped during backward."""

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """A backward that raised part-way leaves the gradients it had not stepped yet: drop them."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def add_param_group(self, group: dict) -> None:
        if hasattr(self, "inner"):
            raise SdtuneError("memory.fused_backward=true steps one parameter at a time; a second parameter "
                              "group (train.text_encoder_lr) cannot join it")
        super().add_param_group(group)

    def state_dict(self) -> dict:
        return {"per_parameter": [optimizer.state_dict() for optimizer in self.inner]}

    def load_state_dict(self, state_dict: dict) -> None:
        for optimizer, state in zip(self.inner, state_dict["per_parameter"], strict=True):
            optimizer.load_state_dict(state)
