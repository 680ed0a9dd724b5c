"""The noise and loss knobs in a real run on the tiny SD 1.x: each reaches the loop's loss, and a run with
all of them on resumes bit for bit (every draw comes from the micro-batch's generator). Their formulas are
checked against sd-scripts' in tests/unit/test_noise_knobs.py."""

from __future__ import annotations

import dataclasses

import torch
from support.helpers import assert_resume_is_bitwise, prepared

from sdtune.train import loop as trainer

KNOBS = {"multires_noise_iterations": 4, "multires_noise_discount": 0.4, "noise_offset": 0.05,
         "noise_offset_random_strength": True, "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True,
         "min_timestep": 100, "max_timestep": 900, "timestep_sampling": "logit_normal", "logit_mean": 0.3,
         "loss": "huber", "huber_schedule": "exponential", "debiased_estimation": True, "snr_gamma": 0.1}
SETS = [f"train.{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in KNOBS.items()]
PLAIN = {"multires_noise_iterations": 0, "noise_offset_random_strength": False, "noise_offset": 0.0,
         "ip_noise_gamma_random_strength": False, "ip_noise_gamma": 0.0, "min_timestep": 0, "max_timestep": 0,
         "logit_mean": 0.0, "timestep_sampling": "uniform", "huber_schedule": "snr", "loss": "l2",
         "debiased_estimation": False, "snr_gamma": 0.0}


def test_each_knob_changes_the_loops_loss(tiny_sd1, images, tmp_path):
    """Micro-batch 0's loss with every knob on, then with one more knob turned off each time: it moves at
    every turn (the knob reached the loss), and all off it is the plain objective's."""
    run = prepared(tiny_sd1, images, tmp_path / "out", *SETS)
    plain = prepared(tiny_sd1, images, tmp_path / "plain")
    with torch.no_grad():
        losses = [trainer.micro_batch_loss(run, run.stream, 0).item()]
        train = run.cfg.train
        for key, value in PLAIN.items():
            train = dataclasses.replace(train, **{key: value})
            run = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, train=train))
            losses.append(trainer.micro_batch_loss(run, run.stream, 0).item())
        expected = trainer.micro_batch_loss(plain, plain.stream, 0).item()
    unmoved = [key for key, a, b in zip(PLAIN, losses[:-1], losses[1:], strict=True) if a == b]
    assert not unmoved, (unmoved, losses)
    assert losses[-1] == expected


def test_a_run_with_the_knobs_resumes_bitwise(tiny_sd1, images, tmp_path):
    sets = [item for s in SETS for item in ("--set", s)]
    assert_resume_is_bitwise(tiny_sd1, images, tmp_path, "--max-steps", "4", "--set", "output.checkpoint_every=2",
                             *sets, last=4, resume_from=2)
