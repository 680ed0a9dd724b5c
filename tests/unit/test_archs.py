"""The bundled architectures: published shapes counted on the meta device, random pipelines that load.

The full-size SD1.5 random pipeline takes ~50 s and 4 GB of disk on a 2-core machine, so the default suite
builds a shrunk copy of the sd15 configs through the same code; SDTUNE_FULL_ARCH_TEST=1 builds the real one.
"""

import json
import os
import shutil

import pytest
import torch

from sdtune.errors import SdtuneError
from sdtune.family import archs
from sdtune.toy.random_pipeline import build_random_pipeline

torch.set_num_threads(1)

# Published parameter counts (the SD1.5 and SDXL UNets, the CLIP ViT-L text encoder, the SD VAE, SD 2.x's UNet,
# and SDXL's OpenCLIP ViT-bigG text encoder with its 1280 x 1280 projection).
KNOWN_COUNTS = {
    ("sd15", "unet"): 859_520_964,
    ("sdxl", "unet"): 2_567_463_684,
    ("sd15", "text_encoder"): 123_060_480,
    ("sd15", "vae"): 83_653_863,
    ("sd21", "unet"): 865_910_724,
    ("sdxl", "text_encoder"): 123_060_480,    # the same CLIP ViT-L/14 text model as SD1.5's
    ("sdxl", "text_encoder_2"): 694_659_840,
    ("sdxl", "vae"): 83_653_863,              # SD's VAE architecture, retrained: only its scaling factor differs
}


@pytest.mark.parametrize("name, part", list(KNOWN_COUNTS))
def test_parameter_counts_match_the_published_models(name, part):
    assert archs.parameter_count(name, part) == KNOWN_COUNTS[name, part]


def test_meta_models_hold_no_memory():
    unet = archs.build_model("sdxl")
    assert {p.device.type for p in unet.parameters()} == {"meta"}


def _config(name, path):
    return json.loads((archs.arch_dir(name) / path).read_text())


def test_sd21_is_v_prediction_with_the_openclip_h_text_encoder():
    unet, text = archs.unet_config("sd21"), _config("sd21", "text_encoder/config.json")
    scheduler = _config("sd21", "scheduler/scheduler_config.json")
    assert (text["hidden_size"], text["num_hidden_layers"], text["hidden_act"]) == (1024, 23, "gelu")
    assert unet["attention_head_dim"] == [5, 10, 20, 20] and unet["use_linear_projection"] is True
    assert scheduler["prediction_type"] == "v_prediction"
    assert archs.parameter_count("sd21", "text_encoder") == 340_387_840


def test_every_architecture_ships_a_whole_pipeline():
    assert archs.pipeline_archs() == list(archs.ARCHS)


@pytest.mark.parametrize("name", archs.pipeline_archs())
def test_pipeline_parts_fit_together(name):
    texts = [_config(name, f"{part}/config.json") for part in ("text_encoder", "text_encoder_2")
             if part in archs.parts(name)]
    vae, unet = _config(name, "vae/config.json"), archs.unet_config(name)
    assert unet["cross_attention_dim"] == sum(text["hidden_size"] for text in texts)  # the contexts concatenated
    if unet.get("addition_embed_type") == "text_time":  # the last encoder's pooled projection + 6 size embeddings
        assert unet["projection_class_embeddings_input_dim"] == texts[-1]["projection_dim"] + 6 * unet[
            "addition_time_embed_dim"]
    assert unet["in_channels"] == vae["latent_channels"]
    assert unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1) == vae["sample_size"]


def test_sdxl_is_the_published_base_pipeline():
    unet = archs.unet_config("sdxl")
    assert unet["addition_embed_type"] == "text_time" and unet["transformer_layers_per_block"] == [1, 2, 10]
    assert archs.parts("sdxl") == {
        "scheduler": ("diffusers", "EulerDiscreteScheduler"), "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "tokenizer": ("transformers", "CLIPTokenizer"), "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL")}
    assert _config("sdxl", "model_index.json")["_class_name"] == "StableDiffusionXLPipeline"
    first, second = _config("sdxl", "text_encoder/config.json"), _config("sdxl", "text_encoder_2/config.json")
    assert (first["hidden_size"], first["num_hidden_layers"], first["hidden_act"]) == (768, 12, "quick_gelu")
    assert (second["hidden_size"], second["num_hidden_layers"], second["num_attention_heads"],
            second["intermediate_size"], second["hidden_act"], second["projection_dim"]) == (1280, 32, 20, 5120,
                                                                                              "gelu", 1280)
    vae = _config("sdxl", "vae/config.json")
    assert (vae["scaling_factor"], vae["force_upcast"]) == (0.13025, True)
    scheduler = _config("sdxl", "scheduler/scheduler_config.json")
    assert (scheduler["_class_name"], scheduler["prediction_type"], scheduler["timestep_spacing"]) == (
        "EulerDiscreteScheduler", "epsilon", "leading")


def test_unknown_names_get_one_clear_line():
    with pytest.raises(SdtuneError, match="choose one of sd15, sd21, sdxl"):
        archs.unet_config("sd3")
    with pytest.raises(SdtuneError, match="no model part 'tokenizer'"):
        archs.build_model("sd15", "tokenizer")
    with pytest.raises(SdtuneError, match="no model part 'text_encoder_2'"):
        archs.build_model("sd15", "text_encoder_2")


def _shrink(folder):
    """Shrink a copy of an architecture's configs to a few channels; everything else stays as shipped."""
    def edit(path, **changes):
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, **changes}))

    edit(folder / "unet/config.json", block_out_channels=[32, 32, 64, 64], cross_attention_dim=32, sample_size=8,
         attention_head_dim=8)
    edit(folder / "vae/config.json", block_out_channels=[32, 32, 32, 32], sample_size=64)
    edit(folder / "text_encoder/config.json", hidden_size=32, intermediate_size=37, num_attention_heads=4,
         num_hidden_layers=2, projection_dim=32)


def _load_and_run(folder, prediction_type):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == prediction_type
    assert pipe.tokenizer.model_max_length == 77 and len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's own
    assert pipe.unet.dtype == torch.float32
    latents = pipe("a red circle on the white background", num_inference_steps=1, height=64, width=64,
                   output_type="latent").images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


@pytest.mark.parametrize("name, prediction_type", [("sd15", "epsilon"), ("sd21", "v_prediction")])
def test_random_pipeline_loads_offline_and_runs(tmp_path, monkeypatch, name, prediction_type):
    root = tmp_path / "archs"
    shutil.copytree(archs.arch_dir(name), root / name)
    _shrink(root / name)
    monkeypatch.setattr(archs, "ARCH_ROOT", root)
    folder = build_random_pipeline(name, tmp_path / "model", seed=1)
    assert {p.name for p in folder.iterdir()} >= {"model_index.json", "unet", "vae", "text_encoder", "tokenizer",
                                                    "scheduler"}
    assert (folder / "unet/diffusion_pytorch_model.safetensors").is_file()
    _load_and_run(folder, prediction_type)


def test_random_pipeline_is_a_function_of_the_seed(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    root = tmp_path / "archs"
    shutil.copytree(archs.arch_dir("sd15"), root / "sd15")
    _shrink(root / "sd15")
    monkeypatch.setattr(archs, "ARCH_ROOT", root)
    weights = [load_file(build_random_pipeline("sd15", tmp_path / f"m{i}", seed=seed)
                         / "unet/diffusion_pytorch_model.safetensors") for i, seed in enumerate((0, 0, 1))]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["conv_in.weight"], weights[2]["conv_in.weight"])


def test_a_real_tokenizer_folder_can_replace_the_tiny_one(tmp_path, monkeypatch, tiny_sd1):
    root = tmp_path / "archs"
    shutil.copytree(archs.arch_dir("sd15"), root / "sd15")
    _shrink(root / "sd15")
    monkeypatch.setattr(archs, "ARCH_ROOT", root)
    folder = build_random_pipeline("sd15", tmp_path / "model", tokenizer_from=tiny_sd1)
    assert (folder / "tokenizer/tokenizer.json").read_text() == (tiny_sd1 / "tokenizer/tokenizer.json").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SDTUNE_FULL_ARCH_TEST"), reason="set SDTUNE_FULL_ARCH_TEST=1 (~1 min, 4 GB)")
def test_full_size_sd15_random_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = build_random_pipeline("sd15", tmp_path / "sd15")
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert sum(p.numel() for p in pipe.unet.parameters()) == KNOWN_COUNTS["sd15", "unet"]
