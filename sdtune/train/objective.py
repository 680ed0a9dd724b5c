"""The denoising objective: `batch_loss`, the diffusion loss of one batch, is the one the training loop,
the validation loss and the estimator's traced step compute. An `Objective` holds the run's noise and loss
knobs (`train.*`: offset and multi-resolution noise, input perturbation, the timestep range and sampling,
the element loss, min-SNR, v-scaling and debiased weights) and draws a batch's noise and timesteps:

    goal = Objective.from_config(cfg.train, alphas_cumprod, prediction_type)
    draw = goal.draw(shape, generator, device, dtype).rows(rows)   # the whole global batch, then this rank's
    loss = batch_loss(unet, latents, draw, hidden, added_cond, objective=goal, mask=mask)

Every formula is kohya's sd-scripts' (library/train_util.py, library/custom_train_functions.py, and
train_network.py for the order: element loss -> mask -> mean per sample -> min-SNR -> v-scaling ->
debiased -> mean); tests/unit/test_noise_knobs.py compares each with their lines. All randomness comes from
an explicit `torch.Generator`, in the order `Objective.draw` documents, so a step's noise is reproducible
from the seed, several processes draw what one does, and a resumed run what the straight one did.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from sdtune.errors import SdtuneError


def sample_noise(shape: tuple, generator: torch.Generator, offset: float = 0.0, device="cpu",
                 dtype: torch.dtype = torch.float32, random_strength: bool = False) -> torch.Tensor:
    """Gaussian noise of the latents' `shape`; `offset` adds a per-channel constant so the model can learn
    overall brightness (with `random_strength`, times a strength drawn from U(0, 1) first, as kohya's
    noise_offset_random_strength).

    Offset noise: https://www.crosslabs.org/blog/diffusion-with-offset-noise
    """
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if offset:
        b, c = shape[:2]
        strength = torch.rand(1, generator=generator, device=device, dtype=dtype) * offset if random_strength \
            else offset
        noise = noise + strength * torch.randn((b, c, 1, 1), generator=generator, device=device, dtype=dtype)
    return noise


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int,
                  discount: float) -> torch.Tensor:
    """Multi-resolution (pyramid) noise, kohya's `pyramid_noise_like`: level i adds Gaussian noise drawn at
    1 / r**i of the size (r from U(2, 4)), bilinearly upsampled, times discount**i; the sum is scaled back to
    unit standard deviation over the whole batch. The draws: every level's r at once (`iterations` uniforms),
    then each level's noise. Computed in fp32, returned in `noise`'s dtype.

    https://wandb.ai/johnowhitaker/multires_noise/reports/Multi-Resolution-Noise-for-Diffusion-Model-Training
    """
    b, c, h, w = noise.shape
    scales = (torch.rand(iterations, generator=generator, device=noise.device, dtype=torch.float32) * 2 + 2).tolist()
    total = noise.float()
    for i, r in enumerate(scales):
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        level = torch.randn(b, c, hn, wn, generator=generator, device=noise.device, dtype=torch.float32)
        total = total + torch.nn.functional.interpolate(level, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break  # the lowest resolution is 1x1
    return (total / total.std()).to(noise.dtype)


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator,
                     device: torch.device, low: int = 0) -> torch.Tensor:
    """Uniform integer timesteps in [low, num_train_timesteps) (kohya's `get_timesteps`)."""
    return torch.randint(low, num_train_timesteps, (batch,), generator=generator, device=device)


def add_noise(latents, noise, timesteps, alphas_cumprod):
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (DDPM forward process)."""
    a = alphas_cumprod.to(latents.device)[timesteps].to(latents.dtype).view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def target(prediction_type: str, latents, noise, timesteps, alphas_cumprod):
    """What the UNet should predict: the noise (epsilon) or the velocity v = sqrt(a) eps - sqrt(1-a) x_0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alphas_cumprod.to(latents.device)[timesteps].to(latents.dtype).view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * latents
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def snr(timesteps, alphas_cumprod) -> torch.Tensor:
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


def min_snr_weights(timesteps, alphas_cumprod, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, https://arxiv.org/abs/2303.09556).

    For an epsilon target the weight is min(SNR, gamma) / SNR; a v target already carries a factor of
    SNR + 1, so it becomes min(SNR, gamma) / (SNR + 1).
    """
    s = snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1) if prediction_type == "v_prediction" else clipped / s


def v_scale_weights(timesteps, alphas_cumprod) -> torch.Tensor:
    """SNR / (SNR + 1), SNR capped at 1000 (t = 0's is near infinite): a v loss weighted like an epsilon loss
    (kohya's scale_v_prediction_loss_like_noise_prediction)."""
    s = torch.clamp(snr(timesteps, alphas_cumprod), max=1000)
    return s / (s + 1)


def debiased_weights(timesteps, alphas_cumprod, prediction_type: str) -> torch.Tensor:
    """1 / sqrt(SNR), or 1 / (SNR + 1) for a v target, SNR capped at 1000 (kohya's apply_debiased_estimation;
    Yu et al. 2023, https://arxiv.org/abs/2310.08442)."""
    s = torch.clamp(snr(timesteps, alphas_cumprod), max=1000)
    return 1 / (s + 1) if prediction_type == "v_prediction" else 1 / torch.sqrt(s)


def element_loss(prediction, target_, kind: str = "l2", threshold: torch.Tensor | None = None) -> torch.Tensor:
    """The per-element loss in fp32 (kohya's `conditional_loss`): squared or absolute error, or pseudo-Huber
    2c(sqrt(d^2 + c^2) - c) / smooth L1 2(sqrt(d^2 + c^2) - c) with each sample's threshold c."""
    difference = prediction.float() - target_.float()
    if kind == "l2":
        return difference.pow(2)
    if kind == "l1":
        return difference.abs()
    c = threshold.to(difference.device, difference.dtype).view(-1, *([1] * (difference.ndim - 1)))
    if kind == "huber":
        return 2 * c * (torch.sqrt(difference**2 + c**2) - c)
    if kind == "smooth_l1":
        return 2 * (torch.sqrt(difference**2 + c**2) - c)
    raise ValueError(f"unsupported loss {kind!r}")


def diffusion_loss(prediction, target_, weights: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   kind: str = "l2", threshold: torch.Tensor | None = None) -> torch.Tensor:
    """The element loss (`element_loss`: squared error by default) in fp32, times `mask` (`[B, 1, h, w]` on
    the latent grid: masked loss, as kohya's `apply_masked_loss` multiplies it in, without renormalising),
    averaged per sample, then weighted and averaged over the batch."""
    error = element_loss(prediction, target_, kind, threshold)
    if mask is not None:
        error = error * mask.to(error.device, error.dtype)
    per_sample = error.mean(dim=tuple(range(1, prediction.ndim)))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


@dataclass(frozen=True)
class Draw:
    """A batch's random draws: the `noise` the target is made of, the `timesteps`, and the input
    perturbation added to the noise the latents are noised with (None: without ip_noise_gamma)."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    perturbation: torch.Tensor | None = None

    def rows(self, rows) -> Draw:
        """This rank's rows of a draw made for the whole global batch."""
        return Draw(self.noise[rows], self.timesteps[rows],
                    None if self.perturbation is None else self.perturbation[rows])

    @property
    def input_noise(self) -> torch.Tensor:
        return self.noise if self.perturbation is None else self.noise + self.perturbation


@dataclass(frozen=True, kw_only=True)
class Objective:
    """The noise and loss settings of a run (`train.*`, the same names), with the noise schedule
    (`alphas_cumprod`) and the target (`prediction_type`) the run trains with. The defaults are the plain
    objective: epsilon/v MSE on Gaussian noise at uniform timesteps (what validation evaluates)."""

    alphas_cumprod: torch.Tensor
    prediction_type: str
    snr_gamma: float = 0.0
    noise_offset: float = 0.0
    noise_offset_random_strength: bool = False
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int = 0
    max_timestep: int = 0
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    loss: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    huber_scale: float = 1.0
    debiased_estimation: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False

    @classmethod
    def from_config(cls, train, alphas_cumprod: torch.Tensor, prediction_type: str) -> Objective:
        """The objective of `train` (a TrainConfig) on the run's schedule and target; refuses what only the
        model decides (a v-scaled loss on an epsilon model, a timestep past the schedule)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"alphas_cumprod", "prediction_type"}
        goal = cls(alphas_cumprod=alphas_cumprod, prediction_type=prediction_type,
                   **{name: getattr(train, name) for name in names})
        if goal.scale_v_pred_loss_like_noise_pred and prediction_type != "v_prediction":
            raise SdtuneError(f"train.scale_v_pred_loss_like_noise_pred=true weights a v-prediction loss, and the "
                              f"model predicts {prediction_type}: set train.prediction_type=v_prediction for a "
                              "v-prediction model, or turn it off")
        if goal.max_timestep > len(alphas_cumprod):
            raise SdtuneError(f"train.max_timestep={goal.max_timestep} is past the model's noise schedule of "
                              f"{len(alphas_cumprod)} timesteps: set it to {len(alphas_cumprod)} or less (0: all)")
        return goal

    def draw(self, shape: tuple, generator: torch.Generator, device, dtype: torch.dtype) -> Draw:
        """Noise and timesteps for a batch of `shape`, drawn from `generator` in kohya's order: the noise, the
        offset's strength (with noise_offset_random_strength) and channel noise, the pyramid's scales and
        levels, the timesteps, the perturbation's strength (with ip_noise_gamma_random_strength) and noise."""
        noise = sample_noise(shape, generator, self.noise_offset, device, dtype, self.noise_offset_random_strength)
        if self.multires_noise_iterations:
            noise = pyramid_noise(noise, generator, self.multires_noise_iterations, self.multires_noise_discount)
        timesteps = self.timesteps(shape[0], generator, device)
        return Draw(noise, timesteps, self.perturbation(shape, generator, device, dtype))

    def timesteps(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        """Integer timesteps in [min_timestep, max_timestep): uniform (kohya's get_timesteps), or logit-normal:
        u = sigmoid(N(logit_mean, logit_std)), t = min + floor(u (max - min)), as sd-scripts' SD3 training maps
        its logit-normal density onto the timesteps (library/sd3_train_utils.py:
        get_noisy_model_input_and_timesteps; the SD3 paper, https://arxiv.org/abs/2403.03206, section 3.1)."""
        low, high = self.min_timestep, self.max_timestep or len(self.alphas_cumprod)
        if self.timestep_sampling == "uniform":
            return sample_timesteps(batch, high, generator, device, low)
        u = torch.sigmoid(torch.normal(self.logit_mean, self.logit_std, (batch,), generator=generator,
                                       device=device))
        return (u * (high - low) + low).long().clamp(max=high - 1)  # u rounds to 1.0 in fp32 past ~17

    def perturbation(self, shape: tuple, generator: torch.Generator, device, dtype) -> torch.Tensor | None:
        """Input perturbation (Ning et al. 2023, https://arxiv.org/abs/2301.11706): gamma x fresh noise, added
        to the noise the latents are noised with but not to the target; None without ip_noise_gamma."""
        if not self.ip_noise_gamma:
            return None
        strength = self.ip_noise_gamma
        if self.ip_noise_gamma_random_strength:
            strength = torch.rand(1, generator=generator, device=device, dtype=dtype) * self.ip_noise_gamma
        return strength * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def threshold(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Each sample's huber/smooth_l1 threshold (kohya's get_huber_threshold_if_needed): snr:
        (1 - c) / (1 + sigma_t)^2 + c with sigma_t = sqrt((1 - a_t) / a_t), from 1 at t = 0 to c; exponential:
        scale x exp(ln(c) t / T); constant: c x scale. None for l2 and l1."""
        if self.loss not in ("huber", "smooth_l1"):
            return None
        if self.huber_schedule == "exponential":
            alpha = -math.log(self.huber_c) / len(self.alphas_cumprod)
            return torch.exp(-alpha * timesteps) * self.huber_scale
        if self.huber_schedule == "snr":
            a = self.alphas_cumprod.to(timesteps.device)[timesteps].float()
            sigmas = ((1.0 - a) / a) ** 0.5
            return (1 - self.huber_c) / (1 + sigmas) ** 2 + self.huber_c
        return torch.full(timesteps.shape, self.huber_c * self.huber_scale, device=timesteps.device)

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Each sample's loss weight, the factors multiplied in train_network.py's order (min-SNR, v-scaling,
        debiased); None when there is none."""
        alphas, factors = self.alphas_cumprod, []
        if self.snr_gamma:
            factors.append(min_snr_weights(timesteps, alphas, self.snr_gamma, self.prediction_type))
        if self.scale_v_pred_loss_like_noise_pred:
            factors.append(v_scale_weights(timesteps, alphas))
        if self.debiased_estimation:
            factors.append(debiased_weights(timesteps, alphas, self.prediction_type))
        return functools.reduce(operator.mul, factors) if factors else None


def batch_loss(model: Callable, latents, draw: Draw, hidden, added_cond: dict | None, *, objective: Objective,
               mask: torch.Tensor | None = None,
               forward: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
    """The diffusion loss of one batch: `latents` noised by the draw's noise (plus its input perturbation) at
    its timesteps, the UNet (`model`, called as diffusers' UNet2DConditionModel is, inside `forward()`:
    autocast for the loop) predicting the epsilon or v target of the draw's noise from the text context
    `hidden` (and SDXL's `added_cond`); the objective's element loss, each latent cell's weighted by `mask`
    (masked loss; None: every cell counts), and its per-sample weights."""
    alphas, timesteps = objective.alphas_cumprod, draw.timesteps
    noisy = add_noise(latents, draw.input_noise, timesteps, alphas)
    with forward():
        prediction = model(noisy, timesteps, hidden, added_cond_kwargs=added_cond).sample
    target_ = target(objective.prediction_type, latents, draw.noise, timesteps, alphas)
    return diffusion_loss(prediction, target_, objective.weights(timesteps), mask, objective.loss,
                          objective.threshold(timesteps))
