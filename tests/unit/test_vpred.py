"""train.prediction_type and train.zero_terminal_snr: the noise schedule the run trains, samples and exports with
(`sdtune.family.load.set_noise_schedule`), checked against kohya's sd-scripts definitions; the single file's
v-prediction and zero-terminal-SNR markers as ComfyUI reads them, and sdtune's loader reading them back."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler

from sdtune.errors import SdtuneError
from sdtune.family import archs
from sdtune.family.load import set_noise_schedule
from sdtune.train.objective import min_snr_weights


def kohya_zero_terminal_snr_alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """sd-scripts, library/custom_train_functions.py: fix_noise_scheduler_betas_for_zero_terminal_snr (its inner
    enforce_zero_terminal_snr, then the alphas_cumprod it sets on the scheduler), transcribed."""
    alphas = 1 - betas
    alphas_bar = alphas.cumprod(0)
    alphas_bar_sqrt = alphas_bar.sqrt()
    alphas_bar_sqrt_0 = alphas_bar_sqrt[0].clone()
    alphas_bar_sqrt_T = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= alphas_bar_sqrt_T
    alphas_bar_sqrt *= alphas_bar_sqrt_0 / (alphas_bar_sqrt_0 - alphas_bar_sqrt_T)
    alphas_bar = alphas_bar_sqrt**2
    alphas = alphas_bar[1:] / alphas_bar[:-1]
    alphas = torch.cat([alphas_bar[0:1], alphas])
    betas = 1 - alphas
    alphas = 1.0 - betas
    return torch.cumprod(alphas, dim=0)


def kohya_min_snr_weight(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """sd-scripts, library/custom_train_functions.py: apply_snr_weight with v_prediction=True, the weight alone."""
    min_snr_gamma = torch.minimum(snr, torch.full_like(snr, gamma))
    return torch.div(min_snr_gamma, snr + 1).float()


def model(arch: str = "sdxl", cls=EulerDiscreteScheduler):
    """A Components stand-in holding the bundled architecture's own scheduler (set_noise_schedule reads no more)."""
    return SimpleNamespace(scheduler=cls.from_pretrained(archs.arch_dir(arch) / "scheduler"))


def test_zero_terminal_snr_trains_on_kohyas_rescaled_schedule_in_v_prediction():
    components = model("sdxl")
    lines = set_noise_schedule(components, "v_prediction", zero_terminal_snr=True, source="sdxl")
    config = components.scheduler.config
    assert (type(components.scheduler).__name__, config.prediction_type, config.rescale_betas_zero_snr,
            config.timestep_spacing) == ("EulerDiscreteScheduler", "v_prediction", True, "trailing")
    assert lines == ["train.prediction_type=v_prediction: sdxl predicts epsilon; training, samples and the export "
                     "use v_prediction"]
    trained = DDPMScheduler.from_config(config).alphas_cumprod  # as sdtune.train.loop.prepare builds it
    # sdxl_train.py's own scheduler, then the fix
    kohya = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    expected = kohya_zero_terminal_snr_alphas_cumprod(kohya.betas)
    torch.testing.assert_close(trained, expected, rtol=1e-6, atol=1e-9)
    assert trained[-1] == 0 and trained[0] == pytest.approx(kohya.alphas_cumprod[0].item())
    untouched = DDPMScheduler.from_config(model("sdxl").scheduler.config).alphas_cumprod
    assert untouched[-1] > 0.004  # the published schedule ends at SNR ~0.005, not 0


def test_min_snr_at_zero_terminal_snr_is_kohyas_weight_and_never_nan():
    components = model("sdxl")
    set_noise_schedule(components, "v_prediction", zero_terminal_snr=True)
    alphas_cumprod = DDPMScheduler.from_config(components.scheduler.config).alphas_cumprod
    timesteps = torch.tensor([0, 250, 500, 998, 999])
    weights = min_snr_weights(timesteps, alphas_cumprod, 5.0, "v_prediction")
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    torch.testing.assert_close(weights, kohya_min_snr_weight(snr, 5.0))
    assert torch.isfinite(weights).all() and weights[-1] == 0  # SNR 0: pure noise, the v target is -x0


def test_zero_terminal_snr_needs_v_prediction_naming_both_keys():
    with pytest.raises(SdtuneError, match=r"train\.zero_terminal_snr=true .* train\.prediction_type=v_prediction"):
        set_noise_schedule(model("sdxl"), "", zero_terminal_snr=True, source="sdxl")
    sd2 = model("sd21")  # the model's own scheduler is v-prediction: no override needed
    assert set_noise_schedule(sd2, "", zero_terminal_snr=True) == []
    assert (sd2.scheduler.config.prediction_type, sd2.scheduler.config.rescale_betas_zero_snr) == ("v_prediction", True)


def test_a_sampler_without_zero_terminal_snr_becomes_euler_and_says_so():
    sd15 = model("sd15", PNDMScheduler)
    lines = set_noise_schedule(sd15, "v_prediction", zero_terminal_snr=True, source="sd15")
    assert type(sd15.scheduler) is EulerDiscreteScheduler and sd15.scheduler.config.rescale_betas_zero_snr
    assert "PNDMScheduler cannot sample a zero-terminal-SNR schedule" in lines[-1] and "Euler" in lines[-1]
    kept = model("sd15", PNDMScheduler)  # without the rescale the model's own sampler stays
    assert set_noise_schedule(kept, "v_prediction") and type(kept.scheduler) is PNDMScheduler
    same = model("sdxl")
    before = same.scheduler
    assert set_noise_schedule(same, "epsilon") == [] and same.scheduler is before  # the model's own already


def test_the_single_file_carries_comfyuis_markers_and_sdtune_reads_them_back(tiny_sdxl, tmp_path):
    from safetensors import safe_open

    from sdtune.export import export_single_file
    from sdtune.family.load import inspect_single_file, load_components

    components = load_components(str(tiny_sdxl))
    set_noise_schedule(components, "v_prediction", zero_terminal_snr=True)
    written = export_single_file(components, tmp_path, force=True)  # the tiny sizes no client reads: forced
    with safe_open(str(written.path), "pt") as f:
        assert f.get_slice("v_pred").get_shape() == [0] and f.get_slice("ztsnr").get_shape() == [0]
        assert f.metadata()["modelspec.predict_key"] == "v"
    assert any("`ztsnr`" in note and "ComfyUI" in note for note in written.notes)
    read = inspect_single_file(written.path)
    assert (read.prediction_type, read.zero_terminal_snr) == ("v_prediction", True)
    loaded = load_components(str(written.path), config=str(tiny_sdxl))
    config = loaded.scheduler.config
    assert (loaded.prediction_type, loaded.zero_terminal_snr, config.timestep_spacing) == ("v_prediction", True,
                                                                                           "trailing")
    plain = export_single_file(load_components(str(tiny_sdxl)), tmp_path, force=True, name="eps.safetensors")
    with safe_open(str(plain.path), "pt") as f:
        assert not {"v_pred", "ztsnr"} & set(f.keys())


def test_an_adapter_or_embedding_runs_base_samples_with_the_runs_noise_schedule(tiny_sdxl, tmp_path):
    from sdtune.config import load_config
    from sdtune.config.toml import to_toml
    from sdtune.lora.apply import base_components

    cfg, info = load_config("cpu", [f"model.pretrained={tiny_sdxl}", "train.method=lora",
                                    "train.prediction_type=v_prediction", "train.zero_terminal_snr=true"])
    (tmp_path / "config.toml").write_text(to_toml(cfg, info))  # what a LoRA run's folder names its base by
    components = base_components(tmp_path)
    assert (components.prediction_type, components.zero_terminal_snr) == ("v_prediction", True)


def test_a_v_prediction_lora_merged_into_another_base_keeps_the_runs_noise_schedule(tiny_sdxl, tmp_path):
    # review of issue 29: `sdtune merge --ckpt RUN --base BASE` wrote the merge with BASE's epsilon scheduler
    # although the LoRA was trained for v-prediction with zero terminal SNR
    from sdtune.config import load_config
    from sdtune.config.toml import to_toml
    from sdtune.lora.apply import _other_base

    cfg, info = load_config("cpu", [f"model.pretrained={tmp_path / 'moved'}", "train.method=lora",
                                    "train.prediction_type=v_prediction", "train.zero_terminal_snr=true"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text(to_toml(cfg, info))
    components = _other_base(tmp_path / "run", str(tiny_sdxl), "")
    assert (components.prediction_type, components.zero_terminal_snr) == ("v_prediction", True)
    components = _other_base(tmp_path, str(tiny_sdxl), "")  # an adapter file alone: the base's own schedule
    assert (components.prediction_type, components.zero_terminal_snr) == ("epsilon", False)
