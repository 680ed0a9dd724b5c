"""The noise and loss knobs of [train] against kohya's sd-scripts: each test transcribes the lines of their
function (named above it; sd-scripts at /work/.mirror/kohya-ss+sd-scripts, HEAD) and compares sdtune's
`Objective` with them on a fixed batch. Kohya draws from the global RNGs (`torch.randn`, `random.random`);
the transcriptions draw the same shapes from one `torch.Generator`, in the order `Objective.draw` documents."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from sdtune.config import Config, apply_layers, parse_set
from sdtune.errors import SdtuneError
from sdtune.train.objective import Draw, Objective, batch_loss, sample_noise, sample_timesteps

SCHEDULER = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ALPHAS = SCHEDULER.alphas_cumprod
SHAPE = (4, 4, 16, 16)


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _objective(*sets, prediction_type="epsilon") -> Objective:
    cfg = apply_layers(Config(), [(parse_set(item), item) for item in sets])
    return Objective.from_config(cfg.train, ALPHAS, prediction_type)


# library/custom_train_functions.py: prepare_scheduler_for_custom_training
def _all_snr(noise_scheduler):
    alphas_cumprod = noise_scheduler.alphas_cumprod
    sqrt_alphas_cumprod = torch.sqrt(alphas_cumprod)
    sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - alphas_cumprod)
    alpha = sqrt_alphas_cumprod
    sigma = sqrt_one_minus_alphas_cumprod
    return (alpha / sigma) ** 2


KOHYA = SimpleNamespace(all_snr=_all_snr(SCHEDULER), alphas_cumprod=SCHEDULER.alphas_cumprod,
                        config=SCHEDULER.config)


# library/custom_train_functions.py: apply_noise_offset (adaptive_noise_scale None), with the strength of
# library/train_util.py: get_noise_noisy_latents_and_timesteps
def _kohya_offset_noise(latents, g, noise_offset, random_strength):
    noise = torch.randn(latents.shape, generator=g)
    if random_strength:
        noise_offset = torch.rand(1, generator=g) * noise_offset
    return noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=g)


# library/custom_train_functions.py: pyramid_noise_like (random.random() -> the level's drawn scale)
def _kohya_pyramid(noise, g, iterations=6, discount=0.4):
    scales = torch.rand(iterations, generator=g).tolist()
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = scales[i] * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn, generator=g)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def test_the_defaults_draw_what_sdtune_drew_before_the_knobs():
    """noise then timesteps, bit for bit (pinned losses stay where they are)."""
    draw = _objective().draw(SHAPE, _generator(), "cpu", torch.float32)
    g = _generator()
    assert torch.equal(draw.noise, sample_noise(SHAPE, g, 0.0))
    assert torch.equal(draw.timesteps, sample_timesteps(SHAPE[0], 1000, g, "cpu"))
    assert draw.perturbation is None and _objective().weights(draw.timesteps) is None


@pytest.mark.parametrize("random_strength", [False, True])
def test_offset_noise_and_its_random_strength_match_kohya(random_strength):
    goal = _objective("train.noise_offset=0.1", f"train.noise_offset_random_strength={str(random_strength).lower()}")
    ours = goal.draw(SHAPE, _generator(1), "cpu", torch.float32).noise
    theirs = _kohya_offset_noise(torch.zeros(SHAPE), _generator(1), 0.1, random_strength)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_multires_noise_matches_kohya_after_the_offset():
    goal = _objective("train.noise_offset=0.1", "train.multires_noise_iterations=6",
                      "train.multires_noise_discount=0.4")
    ours = goal.draw(SHAPE, _generator(2), "cpu", torch.float32).noise
    g = _generator(2)
    theirs = _kohya_pyramid(_kohya_offset_noise(torch.zeros(SHAPE), g, 0.1, False), g, 6, 0.4)
    torch.testing.assert_close(ours, theirs)
    assert abs(ours.std().item() - 1) < 1e-5  # unit variance over the whole batch
    low = torch.nn.functional.avg_pool2d(ours, 8).std()  # the coarse levels: far more low-frequency energy
    plain = torch.nn.functional.avg_pool2d(_objective().draw(SHAPE, _generator(2), "cpu", torch.float32).noise, 8)
    assert low > 1.5 * plain.std()


class _Echo:
    """A stand-in UNet: returns `prediction`, keeps what it was given."""

    def __init__(self, prediction):
        self.prediction = prediction

    def __call__(self, noisy, timesteps, hidden, added_cond_kwargs=None):
        self.noisy, self.timesteps = noisy, timesteps
        return SimpleNamespace(sample=self.prediction)


@pytest.mark.parametrize("random_strength", [False, True])
def test_input_perturbation_noises_the_input_but_not_the_target_as_kohya(random_strength):
    goal = _objective("train.ip_noise_gamma=0.1",
                      f"train.ip_noise_gamma_random_strength={str(random_strength).lower()}")
    latents = torch.randn(SHAPE, generator=_generator(9))
    draw = goal.draw(SHAPE, _generator(3), "cpu", torch.float32)
    model = _Echo(torch.zeros(SHAPE))
    loss = batch_loss(model, latents, draw, None, None, objective=goal)
    # library/train_util.py: get_noise_noisy_latents_and_timesteps (ip_noise_gamma)
    g = _generator(3)
    noise = torch.randn(SHAPE, generator=g)
    timesteps = torch.randint(0, 1000, (SHAPE[0],), generator=g)
    strength = torch.rand(1, generator=g) * 0.1 if random_strength else 0.1
    noisy_latents = SCHEDULER.add_noise(latents, noise + strength * torch.randn(SHAPE, generator=g), timesteps)
    torch.testing.assert_close(model.noisy, noisy_latents)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(torch.zeros(SHAPE), noise))  # target: noise


def test_min_and_max_timestep_draw_kohyas_range():
    goal = _objective("train.min_timestep=200", "train.max_timestep=300")
    ours = goal.timesteps(4096, _generator(4), "cpu")
    # library/train_util.py: get_timesteps
    theirs = torch.randint(200, 300, (4096,), generator=_generator(4)).long()
    assert torch.equal(ours, theirs)
    assert ours.min() == 200 and ours.max() == 299


def test_logit_normal_timesteps_follow_sd3s_mapping():
    goal = _objective("train.timestep_sampling=logit_normal", "train.logit_mean=0.5", "train.logit_std=1.2",
                      "train.min_timestep=100", "train.max_timestep=900")
    ours = goal.timesteps(4096, _generator(5), "cpu")
    # library/sd3_train_utils.py: compute_density_for_timestep_sampling ("logit_normal") and
    # get_noisy_model_input_and_timesteps (training_shift 1)
    u = torch.normal(mean=0.5, std=1.2, size=(4096,), generator=_generator(5))
    u = torch.nn.functional.sigmoid(u)
    indices = (u * (900 - 100) + 100).long()
    assert torch.equal(ours, indices)
    assert 100 <= ours.min() and ours.max() < 900
    median = 100 + 800 * torch.sigmoid(torch.tensor(0.5)).item()  # the median maps through the sigmoid
    assert abs(ours.float().median().item() - median) < 15
    middle = ((ours >= 300) & (ours < 700)).float().mean().item()
    assert middle > 0.5  # uniform would put 0.5 of them there


def test_logit_normal_never_draws_the_exclusive_end():
    goal = _objective("train.timestep_sampling=logit_normal", "train.logit_mean=30")  # sigmoid rounds to 1.0
    assert goal.timesteps(64, _generator(), "cpu").max() == 999


# library/custom_train_functions.py: apply_snr_weight, scale_v_prediction_loss_like_noise_prediction
# (get_snr_scale), apply_debiased_estimation
def _kohya_apply_snr_weight(loss, timesteps, noise_scheduler, gamma, v_prediction=False):
    snr = torch.stack([noise_scheduler.all_snr[t] for t in timesteps])
    min_snr_gamma = torch.minimum(snr, torch.full_like(snr, gamma))
    if v_prediction:
        snr_weight = torch.div(min_snr_gamma, snr + 1).float().to(loss.device)
    else:
        snr_weight = torch.div(min_snr_gamma, snr).float().to(loss.device)
    return loss * snr_weight


def _kohya_scale_v(loss, timesteps, noise_scheduler):
    snr_t = torch.stack([noise_scheduler.all_snr[t] for t in timesteps])
    snr_t = torch.minimum(snr_t, torch.ones_like(snr_t) * 1000)
    scale = snr_t / (snr_t + 1)
    return loss * scale


def _kohya_debiased(loss, timesteps, noise_scheduler, v_prediction=False):
    snr_t = torch.stack([noise_scheduler.all_snr[t] for t in timesteps])
    snr_t = torch.minimum(snr_t, torch.ones_like(snr_t) * 1000)
    if v_prediction:
        weight = 1 / (snr_t + 1)
    else:
        weight = 1 / torch.sqrt(snr_t)
    return weight * loss


# library/train_util.py: get_huber_threshold_if_needed and conditional_loss
def _kohya_huber_c(args, timesteps, noise_scheduler):
    if not (args.loss_type == "huber" or args.loss_type == "smooth_l1"):
        return None
    b_size = timesteps.shape[0]
    if args.huber_schedule == "exponential":
        alpha = -math.log(args.huber_c) / noise_scheduler.config.num_train_timesteps
        result = torch.exp(-alpha * timesteps) * args.huber_scale
    elif args.huber_schedule == "snr":
        alphas_cumprod = torch.index_select(noise_scheduler.alphas_cumprod, 0, timesteps.cpu())
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        result = (1 - args.huber_c) / (1 + sigmas) ** 2 + args.huber_c
    else:
        result = torch.full((b_size,), args.huber_c * args.huber_scale, device=timesteps.device)
    return result


def _kohya_conditional_loss(model_pred, target, loss_type, huber_c):
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(model_pred, target, reduction="none")
    if loss_type == "l1":
        return torch.nn.functional.l1_loss(model_pred, target, reduction="none")
    huber_c = huber_c.view(-1, *([1] * (model_pred.ndim - 1)))
    if loss_type == "huber":
        return 2 * huber_c * (torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)
    return 2 * (torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)


def _kohya_loss(args, prediction, latents, noise, timesteps, mask):
    """train_network.py: NetworkTrainer.process_batch from the prediction on, and post_process_loss."""
    if args.v_parameterization:
        target = SCHEDULER.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    huber_c = _kohya_huber_c(args, timesteps, KOHYA)
    loss = _kohya_conditional_loss(prediction.float(), target.float(), args.loss_type, huber_c)
    loss = loss * mask  # apply_masked_loss, the mask already on the latent grid
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if args.min_snr_gamma:
        loss = _kohya_apply_snr_weight(loss, timesteps, KOHYA, args.min_snr_gamma, args.v_parameterization)
    if args.scale_v_pred_loss_like_noise_pred:
        loss = _kohya_scale_v(loss, timesteps, KOHYA)
    if args.debiased_estimation_loss:
        loss = _kohya_debiased(loss, timesteps, KOHYA, args.v_parameterization)
    return loss.mean()


CASES = [  # (loss, huber_schedule, min-SNR gamma, v_prediction, scale_v, debiased)
    ("l2", "snr", 0, False, False, True),
    ("l2", "snr", 5.0, False, False, True),
    ("l2", "snr", 0, True, True, False),
    ("l2", "snr", 5.0, True, True, True),
    ("l1", "snr", 0, False, False, False),
    ("huber", "snr", 0, False, False, False),
    ("huber", "exponential", 0, True, False, True),
    ("huber", "constant", 5.0, False, False, False),
    ("smooth_l1", "snr", 0, True, True, False),
    ("smooth_l1", "exponential", 0, False, False, False),
    ("smooth_l1", "constant", 0, False, False, True),
]


@pytest.mark.parametrize("kind, schedule, gamma, v, scale_v, debiased", CASES)
def test_loss_value_matches_kohyas_process_batch(kind, schedule, gamma, v, scale_v, debiased):
    prediction_type = "v_prediction" if v else "epsilon"
    goal = _objective(f"train.loss={kind}", f"train.huber_schedule={schedule}", "train.huber_c=0.2",
                      "train.huber_scale=1.5", f"train.snr_gamma={gamma}",
                      f"train.scale_v_pred_loss_like_noise_pred={str(scale_v).lower()}",
                      f"train.debiased_estimation={str(debiased).lower()}", prediction_type=prediction_type)
    g = _generator(6)
    latents, prediction = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    noise = torch.randn(SHAPE, generator=g)
    timesteps = torch.tensor([0, 250, 600, 999])  # t = 0: the SNR caps at 1000
    mask = (torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=g) > 0.3).float()
    ours = batch_loss(_Echo(prediction), latents, Draw(noise, timesteps), None, None, objective=goal, mask=mask)
    args = SimpleNamespace(loss_type=kind, huber_schedule=schedule, huber_c=0.2, huber_scale=1.5,
                           min_snr_gamma=gamma, v_parameterization=v, scale_v_pred_loss_like_noise_pred=scale_v,
                           debiased_estimation_loss=debiased)
    torch.testing.assert_close(ours, _kohya_loss(args, prediction, latents, noise, timesteps, mask),
                               rtol=1e-5, atol=0)


def test_huber_thresholds_fall_from_one_to_c_with_the_snr_schedule():
    goal = _objective("train.loss=huber", "train.huber_c=0.1")
    c = goal.threshold(torch.tensor([0, 999]))
    assert c[0] > 0.9 and abs(c[1].item() - 0.1) < 0.01
    assert _objective().threshold(torch.tensor([0])) is None  # l2 has none


def test_a_v_scaled_loss_on_an_epsilon_model_and_a_timestep_past_the_schedule_are_refused():
    cfg = apply_layers(Config(), [(parse_set("train.scale_v_pred_loss_like_noise_pred=true"), "")])
    with pytest.raises(SdtuneError, match="train.scale_v_pred_loss_like_noise_pred=true .* predicts epsilon"):
        Objective.from_config(cfg.train, ALPHAS, "epsilon")
    cfg = apply_layers(Config(), [(parse_set("train.max_timestep=1000"), "")])
    with pytest.raises(SdtuneError, match="train.max_timestep=1000 is past the model's noise schedule of 500"):
        Objective.from_config(cfg.train, ALPHAS[:500], "epsilon")


@pytest.mark.parametrize("item, says", [
    ("train.max_timestep=1001", "train.max_timestep must be in [1, 1000]"),
    ("train.min_timestep=-1", "train.min_timestep must be in [0, 999]"),
    ("train.huber_c=0", "train.huber_c must be positive"),
    ("train.logit_std=0", "train.logit_std must be positive"),
    ("train.ip_noise_gamma=-0.1", "train.ip_noise_gamma must be >= 0"),
])
def test_out_of_range_knobs_are_one_line_naming_the_key(item, says):
    with pytest.raises(SdtuneError, match=re.escape(says)):
        apply_layers(Config(), [(parse_set(item), item)])

