import torch
from diffusers import DDPMScheduler

from sdtune.train import objective as loss

SCHEDULER = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ALPHAS = SCHEDULER.alphas_cumprod


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(3, 4, 8, 8, generator=g)
    noise = loss.sample_noise(latents.shape, g)
    t = loss.sample_timesteps(3, 1000, g, latents.device)
    return latents, noise, t


def test_forward_process_and_targets_match_diffusers():
    latents, noise, t = _batch()
    noisy = loss.add_noise(latents, noise, t, ALPHAS)
    torch.testing.assert_close(noisy, SCHEDULER.add_noise(latents, noise, t))
    torch.testing.assert_close(loss.target("epsilon", latents, noise, t, ALPHAS), noise)
    torch.testing.assert_close(loss.target("v_prediction", latents, noise, t, ALPHAS),
                               SCHEDULER.get_velocity(latents, noise, t))


def test_v_target_recovers_the_clean_latents():
    latents, noise, t = _batch(1)
    noisy = loss.add_noise(latents, noise, t, ALPHAS)
    v = loss.target("v_prediction", latents, noise, t, ALPHAS)
    a = ALPHAS[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * noisy - (1 - a).sqrt() * v, latents, atol=1e-5, rtol=1e-5)


def test_min_snr_weights():
    t = torch.tensor([0, 500, 999])
    snr = ALPHAS[t] / (1 - ALPHAS[t])
    eps = loss.min_snr_weights(t, ALPHAS, 5.0, "epsilon")
    torch.testing.assert_close(eps, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert eps[0] < 1 and eps[2] == 1  # low-noise steps are down-weighted, high-noise ones kept
    v = loss.min_snr_weights(t, ALPHAS, 5.0, "v_prediction")
    torch.testing.assert_close(v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_noise_offset_shifts_channel_means_only_when_asked():
    latents = torch.zeros(64, 4, 8, 8)
    plain = loss.sample_noise(latents.shape, torch.Generator().manual_seed(0))
    offset = loss.sample_noise(latents.shape, torch.Generator().manual_seed(0), offset=0.5)
    assert plain.mean(dim=(2, 3)).std() < 0.2 < offset.mean(dim=(2, 3)).std()


def test_weighted_loss():
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert loss.diffusion_loss(pred, target).item() == 1.0
    assert loss.diffusion_loss(pred, target, torch.tensor([0.0, 0.5])).item() == 0.25
