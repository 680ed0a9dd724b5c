"""The VRAM estimator against what a tiny model really holds: its trace of a training step agrees with one
measured on the CPU, byte for byte where the bytes are known (weights, gradients, AdamW state). The full-size
plans are tests/e2e/test_estimate.py."""

import pytest
import torch

from sdtune.config import load_config
from sdtune.estimate import estimate
from sdtune.estimate.memtrack import MemoryTracker


def _measured_cpu_step(model_dir, batch: int, side: int) -> dict:
    """One real fp32 training step of a tiny UNet (any family, with its conditioning) on the CPU, measured
    with the estimator's tracker."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from sdtune.family.load import load_components

    c = load_components(str(model_dir))
    unet = c.unet.train()
    unet.set_attn_processor(AttnProcessor2_0())
    cond = c.family.encode(c, [""] * batch)
    extra = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": torch.zeros(batch, 6)}
    latents, target = torch.randn(batch, 4, side, side), torch.randn(batch, 4, side, side)
    tracker = MemoryTracker("cpu")
    tracker.add(unet.parameters(), "weights")
    for p in unet.parameters():
        p.register_post_accumulate_grad_hook(lambda p: tracker.relabel(p.grad, "gradients"))
    with tracker:
        tracker.phase = "activations"
        prediction = unet(latents, torch.full((batch,), 10), cond.hidden, added_cond_kwargs=extra).sample
        forward_end = dict(tracker.current)
        tracker.phase = "temporaries"
        (prediction.float() - target).square().mean().backward()
        del prediction
        backward_end = dict(tracker.current)
        tracker.phase = "optimizer_state"
        optimizer = torch.optim.AdamW(unet.parameters(), fused=True)
        optimizer.step()
    return {"forward_end": forward_end, "backward_end": backward_end, "state": tracker.bytes_of("optimizer_state"),
            "params": sum(p.numel() for p in unet.parameters())}


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_the_trace_matches_a_measured_cpu_step(tiny_sd1, checkpointing):
    cfg, info = load_config("cpu", ["data.resolution=64", "train.batch_size=2",
                                    f"memory.gradient_checkpointing={checkpointing}"])
    if checkpointing == "true":  # the measured step has none: only the estimate's activations shrink
        full = estimate(load_config("cpu", ["data.resolution=64", "train.batch_size=2"])[0], info, str(tiny_sd1),
                        device="cpu")
    guess = estimate(cfg, info, str(tiny_sd1), device="cpu")
    real = _measured_cpu_step(tiny_sd1, batch=2, side=8)
    assert guess.milestones["forward_end"]["weights"] == real["forward_end"]["weights"] == 4 * real["params"]
    assert guess.milestones["backward_end"]["gradients"] == real["backward_end"]["gradients"] == 4 * real["params"]
    assert guess.categories["optimizer_state"] == real["state"]
    activations = guess.milestones["forward_end"]["activations"]
    if checkpointing == "false":
        assert activations == pytest.approx(real["forward_end"]["activations"], rel=0.05)
    else:
        assert activations < 0.5 * full.milestones["forward_end"]["activations"]
    assert guess.categories["cuda_context"] == guess.categories["allocator_overhead"] == 0  # a CPU run


def test_the_sdxl_trace_matches_a_measured_cpu_step(tiny_sdxl):
    """Weights, gradients and AdamW state of the tiny SDXL UNet are the bytes the real tensors take; its
    two text encoders and the VAE are all counted as frozen."""
    from sdtune.family.meta import meta_model

    cfg, info = load_config("cpu", ["data.resolution=64", "train.batch_size=2"])
    guess = estimate(cfg, info, str(tiny_sdxl), device="cpu")
    real = _measured_cpu_step(tiny_sdxl, batch=2, side=8)
    assert guess.milestones["forward_end"]["weights"] == real["forward_end"]["weights"] == 4 * real["params"]
    assert guess.milestones["backward_end"]["gradients"] == real["backward_end"]["gradients"] == 4 * real["params"]
    assert guess.categories["optimizer_state"] == real["state"]
    assert guess.milestones["forward_end"]["activations"] == pytest.approx(real["forward_end"]["activations"],
                                                                           rel=0.05)
    parts = meta_model(str(tiny_sdxl))
    assert len(parts.text_encoders) == 2
    assert guess.categories["frozen"] == 4 * sum(p.numel() for m in parts.frozen for p in m.parameters())


def test_the_sdxl_offloaded_plan_counts_the_tiny_unet_exactly(tiny_sdxl):
    """bf16 working weights on the device, no gradients left there, the host tier's bytes by its own model."""
    from diffusers import UNet2DConditionModel

    from sdtune.optim.tier import HostAdamW

    cfg, info = load_config("rtx3050", ["data.resolution=64", "train.batch_size=1", "data.cache_latents=true",
                                        "data.cache_text=true"])
    guess = estimate(cfg, info, str(tiny_sdxl))
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet")
    shapes = [p.shape for p in unet.parameters()]
    assert guess.categories["weights"] == sum(p.to(torch.bfloat16).nbytes for p in unet.parameters())
    assert guess.milestones["backward_end"]["gradients"] == 0 and guess.categories["optimizer_state"] == 0
    assert guess.host_ram >= HostAdamW.footprint(shapes, itemsize=2).host


def test_a_v_prediction_override_with_v_loss_scaling_is_estimated_not_refused(tiny_sd1):
    # review of issue 29: the trace read the model's own prediction type (epsilon), not train.prediction_type,
    # and refused "scale_v_pred_loss_like_noise_pred ... the model predicts epsilon" (so did --preset auto)
    sets = ["data.resolution=64", "train.batch_size=2", "train.prediction_type=v_prediction"]
    plain = estimate(*load_config("cpu", sets), str(tiny_sd1), device="cpu")
    cfg, info = load_config("cpu", [*sets, "train.scale_v_pred_loss_like_noise_pred=true"])
    scaled = estimate(cfg, info, str(tiny_sd1), device="cpu")
    assert scaled.categories["optimizer_state"] == plain.categories["optimizer_state"] > 0


def test_remembered_meta_ops_change_no_figure(tiny_sd1, monkeypatch):
    """The trace runs each slow meta kernel once per signature and rebuilds the repeats from its outputs'
    metadata (`memtrack._remembered_call`): every figure, milestones included, is the kernels' own (the
    full-size plans, SDXL's too, are compared the same way by bench/estimate_speed.py --check)."""
    from sdtune.estimate import memtrack

    cfg, info = load_config("rtx3050", ["data.resolution=64"])
    monkeypatch.setattr(memtrack, "_OUTPUTS", {})
    remembered = estimate(cfg, info, str(tiny_sd1)).to_dict()
    assert any(kept is not None for kept in memtrack._OUTPUTS.values())  # outputs were rebuilt, not only computed
    monkeypatch.setattr(memtrack, "_shape_only_ops", frozenset)  # every op runs its kernel
    assert estimate(cfg, info, str(tiny_sd1)).to_dict() | {"seconds": 0} == remembered | {"seconds": 0}
