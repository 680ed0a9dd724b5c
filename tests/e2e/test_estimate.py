"""The VRAM estimator at full size: each shipped plan fits its card, the offload tiers, caches and single
files count what they promise (tests/unit/test_estimate_tiny.py checks its trace against measured tiny steps)."""

import pytest
import torch

from sdtune.config import load_config
from sdtune.estimate import estimate

GIB = 2**30


@pytest.mark.parametrize("preset", ["rtx2070", "rtx3050", "rtx3080", "rtx4090"])
def test_each_gpu_preset_fits_its_card_with_sd15_at_512(preset):
    cfg, info = load_config(preset)
    result = estimate(cfg, info, "sd15")
    assert (result.resolution, result.batch_size) == (512, cfg.train.batch_size)
    assert result.fits, f"{preset}: {result.total / GIB:.2f} GiB on a {info.vram_gib} GB card"
    if cfg.memory.optimizer_offload == "cpu":  # the host-RAM goal: a 16 GB desktop, no NVMe
        assert result.host_ram <= 12 * GIB, f"{preset}: {result.host_ram / GIB:.2f} GiB of host RAM"
    if info.vram_gib == 8:
        assert result.total <= 6 * GIB
    assert result.categories["frozen"] > 0 and result.categories["weights"] > 0
    assert result.total == result.peak_reserved + result.categories["cuda_context"]


def test_offload_tiers_move_what_they_promise_off_the_gpu():
    def run(*sets):
        cfg, info = load_config("rtx3050", list(sets))
        return estimate(cfg, info, "sd15")

    plain = run("memory.optimizer_offload=none")
    offloaded = run()
    streamed = run("memory.param_offload=cpu")
    nvme = run("memory.optimizer_offload=nvme", "memory.offload_dir=/tmp")
    params = 859_520_964
    assert plain.categories["optimizer_state"] > 8 * params and plain.categories["weights"] == 4 * params
    assert offloaded.categories["optimizer_state"] == 0 and offloaded.categories["weights"] == 2 * params
    assert offloaded.milestones["backward_end"]["gradients"] == 0  # each gradient left as it was made
    # weights streamed: a pool of 3 buffers of the largest block (119 MiB) instead of all 1.6 GiB
    assert streamed.milestones["forward_end"]["weights"] < 0.25 * offloaded.categories["weights"]
    assert streamed.total < offloaded.total < plain.total
    assert 14 * params < offloaded.host_ram < 14.01 * params  # fp32 master and moments, bf16 staging
    assert nvme.host_ram < offloaded.host_ram / 2
    assert nvme.disk == 12 * params and offloaded.disk == 0


SDXL_UNET, SDXL_TEXT, SDXL_VAE = 2_567_463_684, 123_060_480 + 694_659_840, 83_653_863


def test_sd21_and_sdxl_estimate():
    cfg, info = load_config("rtx4090", ["memory.gradient_checkpointing=true", "memory.optimizer=adamw8bit"])
    sd21 = estimate(cfg, info, "sd21")
    assert sd21.categories["weights"] == 4 * 865_910_724
    sdxl = estimate(cfg, info, "sdxl")
    assert sdxl.categories["weights"] == 4 * SDXL_UNET and not sdxl.notes
    assert sdxl.categories["frozen"] == 2 * (SDXL_TEXT + SDXL_VAE)  # both text encoders and the VAE, in bf16
    assert sdxl.host_ram == 4 * (SDXL_UNET + SDXL_TEXT + SDXL_VAE)  # the fp32 pipeline while it loads


def test_resuming_an_optimizer_on_the_gpu_counts_its_state_in_host_ram():
    """--resume reads `training_state.pt` whole into host RAM before the in-device AdamW state moves to the GPU:
    8 bytes a parameter of the UNet, more than the fp32 pipeline takes while it loads. The host tiers read
    their state file into their own buffers: their row stays what training holds."""
    from sdtune.family import archs
    from sdtune.optim.tier import HostAdamW, Tier

    shapes = [p.shape for p in archs.build_model("sd15").parameters()]
    cfg, info = load_config("rtx4090")  # AdamW on the card
    assert estimate(cfg, info, "sd15").host_ram == Tier.state_bytes(shapes) > 8 * 859_520_964
    cfg, info = load_config("rtx4090", ["memory.optimizer_offload=cpu"])
    passes = cfg.train.gradient_accumulation_steps
    assert estimate(cfg, info, "sd15").host_ram == HostAdamW.footprint(shapes, itemsize=2,
                                                                       accumulation_steps=passes).host


def test_sdxl_cached_encoders_wait_in_host_ram():
    """With both caches the encoders leave the GPU for host memory, in the working precision, beside the tier."""
    from sdtune.family import archs
    from sdtune.optim.tier import HostAdamW

    cfg, info = load_config("rtx3050", ["data.cache_latents=true", "data.cache_text=true", "data.resolution=1024",
                                        "train.batch_size=1"])
    result = estimate(cfg, info, "sdxl")
    shapes = [p.shape for p in archs.build_model("sdxl").parameters()]
    assert result.categories["frozen"] == 0 and result.categories["weights"] == 2 * SDXL_UNET
    assert result.host_ram == HostAdamW.footprint(shapes, itemsize=2).host + 2 * (SDXL_TEXT + SDXL_VAE)


def test_a_single_file_checkpoint_is_estimated_by_its_architecture(tmp_path):
    """Only the header is read: a file with SD2's OpenCLIP text encoder is traced as sd21."""
    from safetensors.torch import save_file

    keys = ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            "first_stage_model.encoder.conv_in.weight", "cond_stage_model.model.token_embedding.weight"]
    save_file({k: torch.zeros(2, dtype=torch.float16) for k in keys}, tmp_path / "model.safetensors")
    cfg, info = load_config("rtx3050")
    result = estimate(cfg, info, str(tmp_path / "model.safetensors"))
    assert result.categories["weights"] == 2 * 865_910_724  # sd21's UNet in bf16
    save_file({"something.else": torch.zeros(2)}, tmp_path / "other.safetensors")
    from sdtune.errors import SdtuneError

    with pytest.raises(SdtuneError, match="not a Stable Diffusion checkpoint sdtune recognises"):
        estimate(cfg, info, str(tmp_path / "other.safetensors"))


def test_cached_latents_and_text_take_the_encoders_off_the_gpu():
    cfg, info = load_config("rtx3050", ["data.cache_latents=true", "data.cache_text=true"])
    assert estimate(cfg, info, "sd15").categories["frozen"] == 0
    cfg, info = load_config("rtx3050", ["data.cache_text=true"])
    assert estimate(cfg, info, "sd15").categories["frozen"] == 2 * 83_653_863  # the VAE alone, in bf16


def test_the_estimate_follows_the_engines_bucket_size_and_ring_depth(monkeypatch):
    """Host RAM comes from the tiers' own byte model: change the engine's bucket size or the nvme ring's
    depth and the estimate moves by what the tier would allocate more."""
    from sdtune.family import archs
    from sdtune.offload import layout, nvme

    cfg, info = load_config("rtx3050", ["memory.optimizer_offload=nvme", "memory.offload_dir=/tmp"])
    numels = [p.numel() for p in archs.build_model("sd15").parameters()]

    def largest() -> int:
        return max(sum(numels[i] for i in r) for r in layout.partition(numels))

    before, bucket = estimate(cfg, info, "sd15").host_ram, largest()
    monkeypatch.setattr(nvme, "RING", nvme.RING + 2)
    deeper = estimate(cfg, info, "sd15").host_ram
    assert deeper - before == 2 * layout.MASTER_BYTES * bucket  # two more ring buffers of the largest bucket
    monkeypatch.setattr(layout, "BUCKET_MB", 4 * layout.BUCKET_MB)
    assert largest() > bucket
    bigger = estimate(cfg, info, "sd15").host_ram  # each ring buffer holds one bucket's state (both > CHUNK)
    assert bigger - deeper == nvme.RING * layout.MASTER_BYTES * (largest() - bucket)


def test_an_sdxl_single_file_is_estimated_as_the_whole_sdxl_pipeline(tmp_path):
    from safetensors.torch import save_file

    keys = ["model.diffusion_model.label_emb.0.0.weight", "first_stage_model.encoder.conv_in.weight",
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
            "conditioner.embedders.1.model.token_embedding.weight"]
    save_file({k: torch.zeros(2) for k in keys}, tmp_path / "xl.safetensors")
    cfg, info = load_config("rtx4090")
    result = estimate(cfg, info, str(tmp_path / "xl.safetensors"))
    assert result.categories["frozen"] == 2 * (SDXL_TEXT + SDXL_VAE)


@pytest.mark.parametrize("preset", ["sdxl-4gb", "sdxl-8gb", "sdxl-12gb", "sdxl-16gb", "sdxl-24gb"])
def test_each_sdxl_preset_fits_its_card_at_1024(preset):
    """By the estimator, within the share of the card `--preset auto` allows; sdxl-8gb with AdamW in at most
    8 GiB of VRAM and 24 GiB of host RAM (its state on disk); sdxl-4gb, its weights streamed too, in at most
    4 GiB of VRAM and 16 GiB of host RAM (a 16 GB desktop)."""
    from sdtune.estimate.auto import SAFETY, preset_family

    cfg, info = load_config(preset)
    assert preset_family(preset) == "sdxl" and cfg.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (cfg.data.resolution, cfg.train.batch_size, cfg.memory.optimizer) == (1024, 1, "adamw")
    assert cfg.data.cache_latents and cfg.data.cache_text
    result = estimate(cfg, info)
    assert result.model == "sdxl" and result.categories["frozen"] == 0
    assert result.total <= SAFETY * info.vram_gib * GIB, f"{preset}: {result.total / GIB:.2f} GiB"
    if preset == "sdxl-8gb":
        assert result.total <= 8 * GIB and result.host_ram <= 24 * GIB
        assert result.disk == 12 * SDXL_UNET
    if preset == "sdxl-4gb":
        assert result.total <= 4 * GIB and result.host_ram <= 16 * GIB and result.disk == 12 * SDXL_UNET
        assert cfg.memory.param_offload == "cpu" and cfg.memory.optimizer_offload == "nvme"
