"""Pretraining from scratch (`model.init = "random"`): a UNet of a chosen architecture with random weights.

    unet = random_unet(cfg.model, seed=0)     # before the base model's VAE and text encoder(s) are loaded

`model.architecture` names the UNet: a bundled architecture (`sd15`, `sd21`, `sdxl`: their published
configs), a folder holding a UNet `config.json` (or a pipeline folder's `unet/`), or nothing: the
UNet config of `model.pretrained` itself. Its weights are diffusers' own initialisation drawn under
`train.seed`, so every process of a launch (FSDP shards without broadcasting) and every rerun builds
the same model. The VAE, text encoder(s), tokenizer(s) and noise schedule still come from
`model.pretrained`; the UNet must fit them (latent channels, text embedding width, SDXL's added
conditioning), which `check_fits` says in one line when it does not.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)


def unet_config_dir(architecture: str, pretrained: str, config: str = "") -> Path:
    """The folder of the UNet `config.json` that `model.architecture` names (see the module docstring)."""
    from sdtune.family import archs
    from sdtune.family.load import classify_source, resolve_source

    if architecture in archs.ARCHS:
        return archs.arch_dir(architecture) / "unet"
    if architecture:
        folder = Path(architecture).expanduser()
        for candidate in (folder / "unet", folder):
            if (candidate / "config.json").is_file():
                return candidate
        raise SdtuneError(f"model.architecture {architecture} is neither a bundled architecture "
                          f"({', '.join(archs.ARCHS)}) nor a folder with a UNet config.json (or unet/config.json)")
    kind = classify_source(pretrained)
    if kind == "folder":
        return Path(resolve_source(pretrained)) / "unet"
    if kind == "single_file":
        from sdtune.family.load import single_file_configs

        return single_file_configs(pretrained, config)[1] / "unet"
    from sdtune.family.load import _hub_file

    return Path(_hub_file(pretrained, "unet/config.json")).parent


def random_unet(architecture: str, pretrained: str, config: str = "", seed: int = 0):
    """The UNet of `architecture` with random weights drawn under `seed` (the global RNG is left as it was)."""
    import torch
    from diffusers import UNet2DConditionModel

    folder = unet_config_dir(architecture, pretrained, config)
    settings = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if settings.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise SdtuneError(f"{folder / 'config.json'} describes a {settings['_class_name']}, not the "
                          "UNet2DConditionModel of Stable Diffusion")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))


def check_fits(components, architecture: str) -> None:
    """One line when the random UNet cannot take the base model's latents or text embeddings."""
    unet, name = components.unet.config, architecture or "model.pretrained's UNet config"
    latents = components.vae.config.latent_channels
    width = sum(encoder.config.hidden_size for encoder in components.text_encoders)
    sdxl = components.family.name == "sdxl"
    problems = [
        (unet.in_channels == latents, f"takes {unet.in_channels} latent channels and the VAE makes {latents}"),
        (unet.cross_attention_dim == width,
         f"attends to text embeddings {unet.cross_attention_dim} wide and the text encoder(s) give {width}"),
        ((unet.addition_embed_type == "text_time") == sdxl,
         "is an SDXL UNet and the base model is not" if not sdxl else "lacks SDXL's added size conditioning"),
    ]
    for ok, problem in problems:
        if not ok:
            raise SdtuneError(f"model.architecture {name} does not fit the base model {components.family.name} "
                              f"(its UNet {problem}); choose an architecture of the base model's family")


def load_for_training(model, seed: int, train=None, meta_unet: bool = False):
    """The components a run trains (`model`: the [model] config): the base model's, with a random UNet of
    `model.architecture` under `model.init=random`, and the noise schedule `train` ([train]) asks for
    (train.prediction_type, train.zero_terminal_snr: `sdtune.family.load.set_noise_schedule`). `meta_unet`:
    the base model's UNet on the meta device, for FSDP's ranks to read their shards into (a random UNet is
    drawn whole on every rank, so that each holds the draws of one process)."""
    from sdtune.family.load import load_components, set_noise_schedule

    if model.init != "random":
        components = load_components(model.pretrained, model.config, meta_unet=meta_unet)
    else:
        unet = random_unet(model.architecture, model.pretrained, model.config, seed)
        components = load_components(model.pretrained, model.config, unet=unet)
        check_fits(components, model.architecture)
        count = sum(p.numel() for p in unet.parameters())
        name = model.architecture or "the architecture of " + model.pretrained
        logger.info(f"model.init=random: pretraining a {count / 1e6:,.1f}M-parameter UNet ({name}) from random "
                    "weights (train.seed)")
    if train is not None:
        for line in set_noise_schedule(components, train.prediction_type, train.zero_terminal_snr, model.pretrained):
            logger.info(line)
    return components
