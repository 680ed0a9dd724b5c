"""Export a diffusers SD 1.x, SD 2.x or SDXL model as one original-layout `.safetensors` file.

ComfyUI, AUTOMATIC1111 and diffusers' own `from_single_file` read checkpoints in the layout of the original
code, CompVis' `ldm` (SD 1.x/2.x) and Stability's `sgm` (SDXL): the UNet under `model.diffusion_model.`
(`input_blocks`, `middle_block`, `output_blocks`, `time_embed`, SDXL's `label_emb`, `out`), the VAE under
`first_stage_model.` (`encoder.down.N.block.M`, `mid.attn_1`, ..., with 1x1-conv attention weights) and the
text encoders under `cond_stage_model.transformer.` (SD1's CLIP-L), `cond_stage_model.model.` (SD2's
OpenCLIP-H) or `conditioner.embedders.0.transformer.` + `conditioner.embedders.1.model.` (SDXL's CLIP-L and
OpenCLIP-bigG; the OpenCLIP layout is `sdtune.export.openclip`'s).

How: every part's keys are renamed to the original layout by `sdtune.family.ldm_names`, whose converters
raise `ValueError` for a key with no entry, so nothing is silently dropped.

    from sdtune.export.single_file import write_single_file
    result = write_single_file(out / "model.safetensors", unet=pipe.unet, vae=pipe.vae,
                               text_encoders=[pipe.text_encoder], prediction_type="epsilon",
                               dtype=torch.float16)
    result.path or result.reason      # written, or one line saying why the clients could not read it

The file is written only for a model ComfyUI and AUTOMATIC1111 can read (`sdtune.export.clients`
says which); `force=True` writes it anyway (the tiny test models). Load it back with
`StableDiffusionPipeline.from_single_file(path, config=<diffusers folder>, ...)` (SDXL: the XL pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdtune.family.ldm_names import (  # noqa: F401  (the names a single file's keys are built from)
    UNET_PREFIX,
    VAE_PREFIX,
    text_encoder_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)


def save_single_file(weights: dict, path, dtype=None, metadata: dict | None = None) -> Path:
    """Write `weights` as one `.safetensors` under a temporary name, then rename it into place (its mode as
    the umask says).

    `dtype` (e.g. `torch.float16`) casts the floating-point tensors; `None` keeps each tensor's dtype. Each
    tensor is cast and written on its own (`sdtune.export.streamed`): no second copy of the model in RAM."""
    import os

    from sdtune.export.streamed import write_streamed
    from sdtune.util.files import follow_umask

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_streamed(weights, tmp, dtype, {"format": "pt", **(metadata or {})})
        follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def pipeline_to_single_file(unet, vae, text_encoder, path, dtype=None) -> Path:
    """Write an SD 1.x model as one LDM-layout `.safetensors` (atomically), readable or not, and return its path."""
    return save_single_file(arch_weights("sd15", unet, vae, [text_encoder]), path, dtype)


def _unet_and_vae(unet, vae) -> dict:
    return {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}


def arch_weights(arch: str, unet, vae, text_encoders: list) -> dict:
    """The whole model of architecture `arch` (sd15, sd21, sdxl) under its original keys: the UNet, the VAE,
    and each text encoder under the prefix its family gives (`Family.single_file_text`)."""
    from sdtune.family import family_of_arch

    prefixes = family_of_arch(arch).single_file_text[arch]
    weights = _unet_and_vae(unet, vae)
    for encoder, prefix in zip(text_encoders, prefixes, strict=True):
        weights.update(_text_weights(encoder, prefix))
    return weights


def _text_weights(encoder, prefix: str) -> dict:
    """One text encoder under `prefix`: ldm/sgm's FrozenCLIPEmbedder (`...transformer.`) keeps transformers'
    CLIP layout; FrozenOpenCLIPEmbedder (`...model.`) has OpenCLIP's (`sdtune.export.openclip`)."""
    if prefix.endswith(".transformer."):
        return text_encoder_to_ldm(encoder.state_dict(), encoder.config, prefix=prefix)
    from sdtune.export.openclip import text_model_to_open_clip

    return text_model_to_open_clip(encoder.state_dict(), prefix)


@dataclass(frozen=True)
class SingleFile:
    """What `write_single_file` did: the file (None when not written), why not, and lines to log."""

    path: Path | None
    reason: str = ""  # "" when written; else one line: why not (for summary.json and the log)
    notes: tuple[str, ...] = ()


def unreadable_reason(unet, vae, text_encoders: list, prediction_type: str) -> str:
    """One line saying why ComfyUI / AUTOMATIC1111 could not read this model as one file ("" when they can):
    no original layout fits it, or one does and its sizes or prediction type are not the published ones."""
    from sdtune.export import clients
    from sdtune.family import architecture_of

    arch = architecture_of(unet, text_encoders)
    if arch is None:
        return f"no original single-file layout for this model ({clients.describe(unet, text_encoders)})"
    return clients.unreadable_reason(arch, unet, vae, text_encoders, prediction_type) or ""


def write_single_file(path, *, unet, vae, text_encoders: list, prediction_type: str, dtype=None,
                      force: bool = False, zero_terminal_snr: bool = False) -> SingleFile:
    """Write the model as one original-layout file where ComfyUI and AUTOMATIC1111 can read it.

    The family (SD 1.x, SD 2.x, SDXL) comes from the modules; a model the clients cannot read (other sizes,
    GroupNorm groups other than 32, an unknown prediction type) is not written and `reason` says why,
    unless `force`. A v-prediction model carries the empty `v_pred` tensor ComfyUI's saver writes, and with
    `zero_terminal_snr` (its schedule rescaled) the empty `ztsnr` tensor of NoobAI-style files, which
    ComfyUI's `supported_models.SDXL.model_type` reads as `sampling_settings["zsnr"]`."""
    import torch

    from sdtune.export import clients
    from sdtune.family import architecture_of

    arch = architecture_of(unet, text_encoders)
    reason = unreadable_reason(unet, vae, text_encoders, prediction_type)
    if arch is None or (reason and not force):  # without a layout not even `force` can write it
        return SingleFile(None, reason)
    weights = arch_weights(arch, unet, vae, text_encoders)
    v_pred = prediction_type == "v_prediction"
    if v_pred:
        weights[clients.V_PRED_KEY] = torch.zeros(0)
    if v_pred and zero_terminal_snr:
        weights[clients.ZTSNR_KEY] = torch.zeros(0)
    metadata = {"modelspec.predict_key": "v" if v_pred else "epsilon"}  # what ComfyUI's saver writes
    notes = (clients.prediction_notes(arch, prediction_type, v_pred and zero_terminal_snr)
             + clients.layout_notes(arch, text_encoders))
    notes += (f"written although clients cannot read it: {reason}",) if reason else ()
    return SingleFile(save_single_file(weights, path, dtype, metadata), "", notes)
