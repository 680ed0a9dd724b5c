"""The denoising objective: `batch_loss`, the diffusion loss of one batch, is the one the training loop,
the validation loss and the estimator's traced step compute; the pure functions under it draw the noise and
timesteps, noise the latents, make the epsilon/v target and the min-SNR weights.

All randomness comes from an explicit `torch.Generator`, so a step's noise is reproducible from the seed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch


def sample_noise(shape: tuple, generator: torch.Generator, offset: float = 0.0, device="cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise of the latents' `shape`; `offset` adds a per-channel constant so the model can learn
    overall brightness.

    Offset noise: https://www.crosslabs.org/blog/diffusion-with-offset-noise
    """
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if offset:
        b, c = shape[:2]
        noise = noise + offset * torch.randn((b, c, 1, 1), generator=generator, device=device, dtype=dtype)
    return noise


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=device)


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


def diffusion_loss(prediction, target_, weights: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error in fp32, times `mask` (`[B, 1, h, w]` on the latent grid: masked loss, as kohya's
    `apply_masked_loss` multiplies it in, without renormalising), averaged per sample, then weighted and
    averaged over the batch."""
    error = (prediction.float() - target_.float()).pow(2)
    if mask is not None:
        error = error * mask.to(error.device, error.dtype)
    per_sample = error.mean(dim=tuple(range(1, prediction.ndim)))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def batch_loss(model: Callable, latents, noise, timesteps, hidden, added_cond: dict | None, *, alphas_cumprod,
               prediction_type: str, snr_gamma: float = 0.0, mask: torch.Tensor | None = None,
               forward: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
    """The diffusion loss of one batch: `latents` noised by `noise` at `timesteps`, the UNet (`model`, called
    as diffusers' UNet2DConditionModel is, inside `forward()`: autocast for the loop) predicting the epsilon or
    v target from the text context `hidden` (and SDXL's `added_cond`), min-SNR-weighted with `snr_gamma`, each
    latent cell's error weighted by `mask` (masked loss; None: every cell counts)."""
    noisy = add_noise(latents, noise, timesteps, alphas_cumprod)
    with forward():
        prediction = model(noisy, timesteps, hidden, added_cond_kwargs=added_cond).sample
    target_ = target(prediction_type, latents, noise, timesteps, alphas_cumprod)
    weights = min_snr_weights(timesteps, alphas_cumprod, snr_gamma, prediction_type) if snr_gamma else None
    return diffusion_loss(prediction, target_, weights, mask)
