"""The one place that loads models (SD 1.x, 2.x, SDXL): a diffusers folder, a single-file checkpoint, a hub id.

    components = load_components("path/to/sd15")             # diffusers folder with model_index.json
    components = load_components("model.safetensors")        # a model site's single file, alone
    components = load_components("model.safetensors", config="sd15")          # ... with the configs named
    components = load_components("stable-diffusion-v1-5/stable-diffusion-v1-5") # hub id, where online
    components = load_components("sdtune-tiny")                                  # bundled with sdtune

The model's family (`sdtune.family`) is read from model_index.json. A single file needs no folder: its
architecture (SD 1.x, 2.x, SDXL) and prediction type are read from its header (`inspect_single_file`),
the configs are the bundled ones of that architecture (`sdtune/archs`, or `model.config`), and each
tokenizer the configs lack is CLIP's, built from the vocabulary sdtune bundles
(`sdtune.family.clip_tokenizer`); `Components.origin` says which in one line. Every tokenizer is checked
against its text encoder before training (`check_text`). Everything is loaded in fp32 on the CPU;
`sdtune.train.placement.place` casts and places it for a plan. With `meta_unet` (FSDP) the UNet is built on
the meta device instead, and `Components.unet_weights` (`sdtune.family.slices`) says where its weights lie,
for each rank to read its shards.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from sdtune.errors import SdtuneError
from sdtune.family.base import Components
from sdtune.util.libraries import quiet_libraries

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
BUNDLED = {"sdtune-tiny": Path(__file__).parent.parent / "assets" / "sdtune-tiny"}  # models shipped in the package
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(source: str) -> str:
    """A bundled model's name becomes its folder; anything else is returned as it is."""
    if source in BUNDLED:
        if not (BUNDLED[source] / "model_index.json").is_file():
            raise SdtuneError(f"the bundled model {source} is missing from this install; run `make tiny-model`")
        return str(BUNDLED[source])
    return source


def classify_source(source: str, option: str = "--model") -> str:
    """'folder', 'single_file' or 'hub' — or a one-line error that says what `source` (given as `option`)
    should be."""
    from sdtune.util.run_folder import is_run_folder

    if not source:
        raise SdtuneError(f"no base model: pass {option} (a diffusers folder, a .safetensors file or a hub id)")
    path = Path(resolve_source(source)).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "folder"
        if is_run_folder(path):  # an sdtune --out folder whose export has not happened yet
            raise SdtuneError(f"{option} {source} is an sdtune run folder without an exported model (the run was "
                              "stopped or is still training): finish it with `sdtune train ... --resume`")
        raise SdtuneError(f"{option} {source} is a folder but not a diffusers pipeline (no model_index.json); "
                          "pass a diffusers folder or a .safetensors checkpoint")
    if path.is_file():
        if path.suffix == ".safetensors":
            return "single_file"
        if path.suffix in PICKLE_SUFFIXES:
            raise SdtuneError(f"{option} {source} is a pickle checkpoint, which can run code when loaded; "
                              "convert it to .safetensors first")
        raise SdtuneError(f"{option} {source} is neither a diffusers folder nor a .safetensors checkpoint")
    if _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return "hub"
    raise SdtuneError(f"{option} {source} does not exist: pass a diffusers folder, a .safetensors file or a hub id")


def check_pipeline_class(index_path: Path):
    """The family of the diffusers folder whose model_index.json is `index_path`; an error for others."""
    from sdtune.family import family_for_class

    return family_for_class(json.loads(index_path.read_text()).get("_class_name", ""), str(index_path.parent))


def _family(source: str, kind: str, config: str):
    from sdtune.family import family_for_class, family_named

    if kind == "folder":
        return check_pipeline_class(Path(source) / "model_index.json")
    if kind == "single_file":
        checkpoint = inspect_single_file(Path(source))
        if not config:
            return family_named(checkpoint.family)
        family = check_pipeline_class(config_dir(config) / "model_index.json")
        if family.name != checkpoint.family:
            raise SdtuneError(f"{source} and model.config {config} are of different model families "
                              f"({checkpoint.family} and {family.name}): pass the configs of its own, or none")
        return family
    try:  # a hub id: its model_index.json says which pipeline it is
        index = json.loads(Path(_hub_file(source, "model_index.json")).read_text())
    except OSError as exc:
        if not hub_online():
            raise SdtuneError(f"could not fetch '{source}': the Hugging Face hub cannot be reached (offline, or "
                              "HF_HUB_OFFLINE is set) and it is not in the local cache; pass --model a local "
                              "diffusers folder or a .safetensors checkpoint (a model site's file works "
                              "alone)") from None
        raise SdtuneError(f"could not fetch '{source}' from the Hugging Face hub ({str(exc).splitlines()[0]}); "
                          "download it, or pass a local diffusers folder with --model") from None
    return family_for_class(index.get("_class_name", ""), source)


def _hub_file(repo: str, name: str) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, name, local_files_only=not hub_online())


@functools.cache
def hub_online() -> bool:
    """Whether the Hugging Face hub can be reached: False at once where HF_HUB_OFFLINE is set or its host
    (`HF_ENDPOINT`'s, at its port) takes no connection within 3 s, where huggingface_hub would retry for about
    25 s before its error. A model in the local cache still loads then (`local_files_only`). Behind a proxy
    (HTTPS_PROXY, ...), which huggingface_hub goes through and a direct connection would not, the hub is
    taken as reachable and huggingface_hub answers."""
    import socket
    from urllib.parse import urlparse
    from urllib.request import getproxies

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if getproxies():
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout=3).close()
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class CheckpointFile:
    """What a single-file checkpoint holds, read from its header (key names, a few shapes, metadata)."""

    arch: str                 # the bundled architecture whose configs fit it: sd15, sd21 or sdxl
    prediction_type: str      # epsilon or v_prediction
    dtype: str                # its UNet's weights: F16, BF16 or F32, as safetensors names them
    zero_terminal_snr: bool = False  # an SDXL v-prediction file marked `ztsnr` (NoobAI-style)
    marked: bool = False      # the prediction type is the file's own word (a `v_pred` key, modelspec metadata)

    @property
    def family(self) -> str:
        from sdtune.family.archs import FAMILY_OF

        return FAMILY_OF[self.arch]


UNET_KEYS, VAE_KEYS = "model.diffusion_model.", "first_stage_model."
V_PRED_PROBE = UNET_KEYS + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


def inspect_single_file(path: Path) -> CheckpointFile:
    """The architecture and prediction type of a single-file checkpoint, without reading its weights; a
    one-line error that says what the file is when it is not a whole SD 1.x, 2.x or SDXL model.

    The family is told by the text encoders' layout (SD1's CLIP-L under `cond_stage_model.transformer.`,
    SD2's OpenCLIP-H under `cond_stage_model.model.`, SDXL's two under `conditioner.embedders.`), as
    ComfyUI and AUTOMATIC1111 tell it. v-prediction is the `v_pred` key ComfyUI's saver writes (or the
    `modelspec.predict_key` metadata); an SD 2.x file without either is judged as ComfyUI judges it: v
    where the last attention block's first norm bias has a standard deviation above 0.09 (trained 768-v
    weights), else epsilon (the 512 base)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys, metadata = set(f.keys()), f.metadata() or {}
            arch = _architecture(path, keys)
            dtype = next((f.get_slice(k).get_dtype() for k in sorted(keys) if k.startswith(UNET_KEYS)), "F32")
            marked = "v_pred" in keys or "modelspec.predict_key" in metadata
            v_pred = "v_pred" in keys or metadata.get("modelspec.predict_key") == "v"
            if arch == "sd21" and not marked and V_PRED_PROBE in keys:
                v_pred = float(f.get_tensor(V_PRED_PROBE).float().std(unbiased=False)) > 0.09
    except (OSError, SafetensorError) as exc:
        raise SdtuneError(f"{path} is not a readable .safetensors file ({str(exc).splitlines()[0]})") from None
    return CheckpointFile(arch, "v_prediction" if v_pred else "epsilon", dtype,
                          zero_terminal_snr=v_pred and "ztsnr" in keys, marked=marked)


def _architecture(path: Path, keys: set) -> str:
    """sd15, sd21 or sdxl; or an error naming what else the file is (a LoRA, a VAE, an embedding...)."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    what = _not_a_checkpoint(keys, has)
    if what:
        raise SdtuneError(f"{path} is {what}, not a whole model: --model takes a Stable Diffusion checkpoint "
                          "(UNet, VAE and text encoders in one file), a diffusers folder or a hub id")
    arch = next((name for name, prefixes in _text_keys().items() if all(has(p) for p in prefixes)), None)
    if has(UNET_KEYS + "label_emb.") and arch != "sdxl":
        refiner = has("conditioner.embedders.0.model.")
        raise SdtuneError(f"{path} is {'an SDXL refiner' if refiner else 'an SDXL UNet without its text encoders'}; "
                          "sdtune trains SDXL base models (two text encoders: CLIP-L and OpenCLIP-bigG)")
    if arch is None:
        raise SdtuneError(f"{path} has a UNet but no text encoder sdtune knows (SD 1.x: cond_stage_model.transformer, "
                          "SD 2.x: cond_stage_model.model, SDXL: conditioner.embedders); pass a whole checkpoint")
    if not has(VAE_KEYS):
        raise SdtuneError(f"{path} has no VAE (no {VAE_KEYS} keys); pass a checkpoint with its VAE baked in")
    return arch


def _text_keys() -> dict[str, tuple[str, ...]]:
    """Architecture -> where its text encoders' keys start in a single file, as each family names them."""
    from sdtune.family import families

    return {arch: prefixes for family in families().values()
            for arch, prefixes in family.single_file_text.items()}


def _not_a_checkpoint(keys: set, has) -> str:
    """What a .safetensors file without a Stable Diffusion UNet is, in a user's words; "" for a checkpoint."""
    if has(UNET_KEYS):
        return ""
    if any(".lora_down." in k or ".lora_A." in k or k.startswith(("lora_unet_", "lora_te")) or ".hada_w1" in k
           or ".lokr_w1" in k for k in keys):
        return "a LoRA (or LyCORIS) adapter file"
    if {"emb_params"} & keys or {"clip_l", "clip_g"} & keys or has("string_to_param"):
        return "a textual-inversion embedding"
    if has("encoder.down") and has("decoder.up") or has(VAE_KEYS):
        return "a VAE alone"
    if has("down_blocks.") and has("conv_in."):
        return "a diffusers UNet's weights alone (pass the pipeline folder that holds its unet/ folder)"
    if has("text_model.") or has("transformer.resblocks."):
        return "a text encoder alone"
    if has("model.diffusion_model.joint_blocks.") or has("double_blocks.") or has("joint_blocks."):
        return "an SD3 or Flux model, which sdtune does not train"
    return "not a Stable Diffusion checkpoint sdtune recognises"


def config_dir(config: str) -> Path:
    """The folder of configs `model.config` names: a bundled architecture (sd15, sd21, sdxl) or a folder."""
    from sdtune.family import archs

    if config in archs.ARCHS:
        return archs.arch_dir(config)
    folder = Path(config).expanduser()
    if not (folder / "model_index.json").is_file():
        raise SdtuneError(f"model.config {config} is neither a bundled architecture ({', '.join(archs.ARCHS)}) "
                          "nor a diffusers folder (no model_index.json)")
    return folder


def single_file_configs(source: str, config: str = "") -> tuple[CheckpointFile, Path]:
    """(what the single file `source` is, the folder of configs it loads with): `model.config`'s (a bundled
    architecture or a diffusers folder), else the bundled configs of the file's own architecture."""
    from sdtune.family import archs

    checkpoint = inspect_single_file(Path(source))
    return checkpoint, config_dir(config) if config else archs.arch_dir(checkpoint.arch)


def single_file_parts(source: str, config: str) -> tuple[Path, dict, str]:
    """(the configs folder, the parts a single file lacks, one line saying what was used) for loading
    `source` alone: its family's bundled configs unless `config` names others, each tokenizer the folder
    lacks from the bundled CLIP vocabulary, and the scheduler. Its prediction type is the file's where the
    file says it or the configs are the bundled ones (judged from the file), else the named folder's."""
    import diffusers

    from sdtune.family import archs
    from sdtune.family.clip_tokenizer import clip_tokenizer, pad_token

    checkpoint, folder = single_file_configs(source, config)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    bundled = not config or config in archs.ARCHS
    parts, made, prediction = {}, [], checkpoint.prediction_type
    for name, (_, class_name) in ((k, v[:2]) for k, v in index.items() if isinstance(v, list) and v[0]):
        if class_name.endswith("Tokenizer") and not (folder / name).is_dir():
            encoder = json.loads((folder / name.replace("tokenizer", "text_encoder") / "config.json").read_text())
            parts[name] = clip_tokenizer(pad_token(encoder.get("hidden_act", "")))
            made.append(name)
        elif class_name.endswith("Scheduler"):
            cls = getattr(diffusers, class_name)
            settings = cls.load_config(folder / name)
            if checkpoint.marked or bundled:
                settings["prediction_type"] = checkpoint.prediction_type
            prediction = settings.get("prediction_type", "epsilon")
            if checkpoint.zero_terminal_snr:
                settings.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
            parts[name] = cls.from_config(settings)
    where = f"configs {folder.name} (bundled)" if bundled else f"configs {folder}"
    tokens = f"sdtune's bundled CLIP tokenizer ({', '.join(made)})" if made else "the configs' tokenizers"
    said = "" if checkpoint.marked or bundled else ", the configs' prediction type"
    line = (f"{Path(source).name}: {ARCH_NAMES[checkpoint.arch]} single file ({checkpoint.dtype}, {prediction}"
            f"{said}{', zero terminal SNR' if checkpoint.zero_terminal_snr else ''}); {where}; {tokens}")
    return folder, parts, line


ARCH_NAMES = {"sd15": "SD 1.x", "sd21": "SD 2.x", "sdxl": "SDXL"}


def check_source(source: str, config: str = "") -> None:
    """The one-line errors of `load_components` that need no weights read: a missing path, a file that is not
    a whole model, configs that do not exist (before a run scans its data)."""
    if classify_source(source) == "single_file":
        single_file_configs(source, config)


def load_components(source: str, config: str = "", unet=None, meta_unet: bool = False) -> Components:
    """Load a model of any family sdtune trains from `source` (see the module docstring) in fp32 on the CPU;
    `unet`, a UNet to use instead of the source's (which is then not read: `sdtune.family.scratch`). With
    `meta_unet` the UNet is built on the meta device and `unet_weights` says where its weights lie (where they
    are in .safetensors files; else it loads as usual). Its text side is checked (`check_text`); `origin` says
    in one line what was loaded and from which configs."""
    resolved, kind = resolve_source(source), classify_source(source)
    family = _family(resolved, kind, config)
    quiet_libraries()
    weights = None
    if meta_unet and unet is None:
        unet, weights = _meta_unet(resolved, kind, config)
    parts, origin = {"unet": unet} if unet else {}, ""
    if kind == "single_file":
        folder, missing, origin = single_file_parts(resolved, config)
        config, parts = str(folder), {**missing, **parts}
    elif kind == "hub" and not hub_online():
        parts["local_files_only"] = True  # from the local cache, without the retries
    components = family.components(family.load_pipeline(resolved, kind, config, **parts))
    components.origin, components.unet_weights = origin, weights
    check_text(components, source)
    return components


def _meta_unet(source: str, kind: str, config: str):
    """(the source's UNet built on the meta device, its `UnetWeights`); (None, None) where its weights are not
    in .safetensors files sdtune can read by name (a .bin UNet, a hub id not in reach)."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdtune.family.slices import UnetWeights, folder_keys

    if kind == "single_file":
        folder = single_file_configs(source, config)[1] / "unet"
    elif kind == "folder":
        folder = Path(source) / "unet"
    else:
        from huggingface_hub.errors import EntryNotFoundError

        try:  # the weights too: on a model's first run the cache would hold only the config yet
            folder = Path(_hub_file(source, "unet/config.json")).parent
            _hub_unet_weights(source)
        except (OSError, EntryNotFoundError):  # not in reach, or no .safetensors UNet: the ordinary load
            return None, None
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
    names = list(unet.state_dict())
    keys = folder_keys(folder) if kind != "single_file" else _single_file_keys(Path(source), names, unet.config)
    if keys is None or set(names) - set(keys):
        return None, None
    return unet, UnetWeights(keys)


def _hub_unet_weights(repo: str) -> None:
    """Bring the hub model's UNet weights into the local cache, where `folder_keys` and then the pipeline's load
    find them: one .safetensors file, or the files its index names."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        _hub_file(repo, "unet/diffusion_pytorch_model.safetensors")
        return
    except EntryNotFoundError:  # saved in several files
        pass
    index = Path(_hub_file(repo, "unet/diffusion_pytorch_model.safetensors.index.json"))
    for name in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())):
        _hub_file(repo, f"unet/{name}")


def _single_file_keys(path: Path, names: list[str], config):
    from sdtune.family.ldm_names import unet_to_ldm
    from sdtune.family.slices import single_file_keys

    try:
        return single_file_keys(path, unet_to_ldm({name: name for name in names}, config))
    except ValueError:  # a UNet of a layout the export does not write
        return None


def check_text(components: Components, source: str) -> None:
    """One line before training when a tokenizer would make captions meaningless: its vocabulary does not
    fit its text encoder's embedding table, or it maps different captions to the same ids or to unknown
    tokens (a tokenizer without its vocabulary turns every word of every caption into the unknown token)."""
    probes = ("a photo of a cat", "red square, blue sky")
    for n, (tokenizer, encoder) in enumerate(zip(components.tokenizers, components.text_encoders, strict=True)):
        which = "tokenizer" + (f"_{n + 1}" if n else "")
        rows = encoder.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            raise SdtuneError(f"{source}: its {which} has {len(tokenizer):,} tokens but its text encoder's embedding "
                              f"table only {rows:,} rows: they are not a pair; use the tokenizer the encoder was "
                              "trained with")
        ids = [tokenizer(text).input_ids for text in probes]
        words = [i for row in ids for i in row[1:-1]]  # between the start and end tokens
        unknown = sum(i == tokenizer.unk_token_id for i in words) / max(len(words), 1)
        if ids[0] == ids[1] or unknown > 0.5:
            raise SdtuneError(f"{source}: its {which} gives different captions the same tokens ('{probes[0]}' is "
                              f"{ids[0]}, {unknown:.0%} unknown): its vocabulary is missing or broken, so every "
                              "caption would train as the same text; use the model's own tokenizer folder")


def assemble_pipeline(components: Components):
    """The family's inference pipeline sharing `components`' modules (no copies), for sampling or saving."""
    return components.family.assemble(components)


ZTSNR_SAMPLER = "EulerDiscreteScheduler"  # SDXL's own sampler; it takes rescale_betas_zero_snr (PNDM and LMS do not)


def set_noise_schedule(components: Components, prediction_type: str = "", zero_terminal_snr: bool = False,
                       source: str = "the model") -> list[str]:
    """Replace `components.scheduler` by one that predicts `prediction_type` (train.prediction_type; "" keeps the
    model's own) and, with `zero_terminal_snr`, whose betas are rescaled so the last step is pure noise
    (diffusers' `rescale_betas_zero_snr`, the formula of kohya's `fix_noise_scheduler_betas_for_zero_terminal_snr`)
    and whose sampling timesteps are trailing (Lin et al. 2023, https://arxiv.org/abs/2305.08891). Training's
    target and schedule, samples, validation and the export all read this scheduler. Returns the lines to log."""
    scheduler, lines = components.scheduler, []
    own = scheduler.config.get("prediction_type", "epsilon")
    settings = {"prediction_type": prediction_type} if prediction_type and prediction_type != own else {}
    if settings:
        lines.append(f"train.prediction_type={prediction_type}: {source} predicts {own}; training, samples and the "
                     f"export use {prediction_type}")
    cls = type(scheduler)
    if zero_terminal_snr and (prediction_type or own) != "v_prediction":
        raise SdtuneError(f"train.zero_terminal_snr=true needs v-prediction (epsilon cannot be predicted from pure "
                          f"noise) and {source} predicts {own}: set train.prediction_type=v_prediction")
    if zero_terminal_snr and not scheduler.config.get("rescale_betas_zero_snr", False):
        settings.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        if not _takes_zero_snr(cls):
            import diffusers

            lines.append(f"train.zero_terminal_snr: {cls.__name__} cannot sample a zero-terminal-SNR schedule; "
                         f"samples and the export use {ZTSNR_SAMPLER} (trailing timesteps)")
            cls = getattr(diffusers, ZTSNR_SAMPLER)
    if settings:
        components.scheduler = cls.from_config(scheduler.config, **settings)
    return lines


def _takes_zero_snr(cls) -> bool:
    import inspect

    return "rescale_betas_zero_snr" in inspect.signature(cls.__init__).parameters
