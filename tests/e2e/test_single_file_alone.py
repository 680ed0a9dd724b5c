"""A model site's single-file checkpoint alone: its family and prediction type from its header, the bundled
configs, CLIP's tokenizer built offline, and one line for a file that is not a whole model."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from sdtune.cli import app
from sdtune.errors import SdtuneError
from sdtune.family.clip_tokenizer import clip_tokenizer
from sdtune.family.load import inspect_single_file, load_components

# Token ids from OpenAI's reference tokenizer (clip/simple_tokenizer.py, as open_clip 3.3 ships it) with the
# bundled merges' source file, bpe_simple_vocab_16e6.txt.gz: the ids SD 1.x's CLIP ViT-L/14 reads.
REFERENCE = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "1girl, solo, long_hair, looking_at_viewer, smile, (masterpiece:1.2), best quality":
        [49406, 272, 1611, 267, 5797, 267, 1538, 318, 2225, 267, 1312, 318, 536, 318, 15061, 267, 3490, 267, 263,
         12066, 281, 272, 269, 273, 2361, 949, 3027, 49407],
    "A Photo Of SKS Dog  in   the snow!!": [49406, 320, 1125, 539, 48136, 1929, 530, 518, 2583, 748, 49407],
    "café crème brûlée, naïve façade":
        [49406, 15304, 1075, 12138, 614, 711, 127, 119, 75, 13489, 267, 1097, 35689, 563, 778, 10067, 1928, 49407],
    "日本語のキャプション, anime style":
        [49406, 39121, 44353, 34002, 252, 21575, 47121, 2429, 96, 2429, 245, 37665, 2429, 100, 26875, 267, 6469,
         1844, 49407],
    "emoji 🐱🐶 test": [49406, 16327, 35710, 10631, 1628, 49407],
    "it's a dog's life, we're fine, they'd've":
        [49406, 585, 568, 320, 1929, 568, 970, 267, 649, 982, 3797, 267, 889, 1896, 1200, 49407],
    "score_9, score_8_up, rating:safe, <lora:foo:0.8>":
        [49406, 4431, 318, 280, 267, 4431, 318, 279, 318, 705, 267, 10567, 281, 2996, 267, 283, 2179, 320, 281,
         23435, 281, 271, 269, 279, 285, 49407],
    "3d render of 42 cubes, 1024x768, f/1.8, 50mm":
        [49406, 274, 323, 13024, 539, 275, 273, 31413, 267, 272, 271, 273, 275, 343, 278, 277, 279, 267, 325, 270,
         272, 269, 279, 267, 276, 271, 2848, 49407],
    "hyphen-ated and under_scored and dot.ted words":
        [49406, 1441, 745, 576, 268, 943, 537, 1798, 318, 6143, 537, 7004, 269, 775, 2709, 49407],
    "tab\tand\nnewline": [49406, 14724, 537, 1218, 1148, 49407],
    "BREAK tokens and [brackets] {braces} |pipes|":
        [49406, 2568, 23562, 537, 314, 36183, 316, 346, 19249, 348, 347, 16991, 347, 49407],
}


def test_the_bundled_tokenizer_tokenizes_as_clip_does():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    for caption, ids in REFERENCE.items():
        assert tokenizer(caption).input_ids == ids, caption


def test_clip_l_pads_with_end_of_text_and_open_clip_with_the_exclamation_mark():
    """SD 1.x and SDXL's first tokenizer pad with <|endoftext|>; SD 2.x's and SDXL's second with "!" (id 0)."""
    def padded(pad):
        return clip_tokenizer(pad)("a photo of a cat", padding="max_length", max_length=77).input_ids

    assert padded("<|endoftext|>") == REFERENCE["a photo of a cat"] + [49407] * 70
    assert padded("!") == REFERENCE["a photo of a cat"] + [0] * 70


def _header_file(path, keys, metadata=None, tensor=None):
    save_file({key: (tensor if tensor is not None else torch.zeros(1, 1)) for key in keys}, str(path), metadata)
    return path


SD1 = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
       "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
SD2 = [*SD1[:2], "cond_stage_model.model.token_embedding.weight"]
SDXL = [*SD1[:2], "model.diffusion_model.label_emb.0.0.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.1.model.token_embedding.weight"]


def test_a_single_file_says_its_architecture_and_prediction_type(tmp_path):
    assert inspect_single_file(_header_file(tmp_path / "a.safetensors", SD1)).arch == "sd15"
    assert inspect_single_file(_header_file(tmp_path / "b.safetensors", SD2)).arch == "sd21"
    xl = inspect_single_file(_header_file(tmp_path / "c.safetensors", SDXL))
    assert (xl.arch, xl.family, xl.prediction_type, xl.dtype) == ("sdxl", "sdxl", "epsilon", "F32")
    v = inspect_single_file(_header_file(tmp_path / "d.safetensors", [*SDXL, "v_pred", "ztsnr"]))
    assert (v.prediction_type, v.zero_terminal_snr) == ("v_prediction", True)
    sd1_v = _header_file(tmp_path / "e.safetensors", SD1, {"modelspec.predict_key": "v"})  # what sdtune writes
    assert inspect_single_file(sd1_v).prediction_type == "v_prediction"
    # SD 2.x without a marker: ComfyUI's rule, the last attention block's norm bias spread (trained 768-v > 0.09)
    probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    spread = torch.linspace(-1, 1, 320)
    save_file({**{k: torch.zeros(1) for k in SD2}, probe: spread}, str(tmp_path / "f.safetensors"))
    assert inspect_single_file(tmp_path / "f.safetensors").prediction_type == "v_prediction"
    save_file({**{k: torch.zeros(1) for k in SD2}, probe: spread * 0.01}, str(tmp_path / "g.safetensors"))
    assert inspect_single_file(tmp_path / "g.safetensors").prediction_type == "epsilon"


NOT_MODELS = {
    "a LoRA": ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"],
    "a VAE alone": ["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"],
    "a textual-inversion embedding": ["clip_l", "clip_g"],
    "an SDXL refiner": ["model.diffusion_model.label_emb.0.0.weight", "first_stage_model.encoder.conv_in.weight",
                        "conditioner.embedders.0.model.token_embedding.weight"],
    "no VAE": [SD1[0], SD1[2]],
}


@pytest.mark.parametrize("what", list(NOT_MODELS))
def test_a_file_that_is_not_a_whole_model_is_one_line(what, tmp_path, images):
    path = _header_file(tmp_path / "file.safetensors", NOT_MODELS[what])
    result = CliRunner().invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(path),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and what in lines[0] and "Traceback" not in result.output, result.output


def test_a_tokenizer_without_its_vocabulary_is_refused_before_training(tiny_sd1, images, tmp_path):
    """A config folder whose tokenizer has lost its vocabulary turns every caption into start + unknown + end."""
    model = tmp_path / "model"
    shutil.copytree(tiny_sd1, model)
    tokenizer_json = model / "tokenizer" / "tokenizer.json"
    spec = json.loads(tokenizer_json.read_text())
    spec["model"]["vocab"] = {t: i for t, i in spec["model"]["vocab"].items() if t.startswith("<|")}
    spec["model"]["merges"] = []
    tokenizer_json.write_text(json.dumps(spec))
    result = CliRunner().invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(model),
                                      "--out", str(tmp_path / "out"), "--max-steps", "1"])
    assert result.exit_code == 2, result.output
    assert "gives different captions the same tokens" in result.output
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_tokenizer_larger_than_its_encoder_is_refused(tiny_sd1, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd1, model)
    shutil.rmtree(model / "tokenizer")
    clip_tokenizer().save_pretrained(model / "tokenizer")  # 49,408 tokens for a 2-layer toy encoder's table
    with pytest.raises(SdtuneError, match="49,408 tokens but its text encoder's embedding table only"):
        load_components(str(model))


def test_a_hub_id_fails_at_once_offline(monkeypatch):
    from sdtune.family import load as models

    monkeypatch.setattr(models, "hub_online", lambda: False)
    with pytest.raises(SdtuneError, match="hub cannot be reached .* not in the local cache"):
        load_components("nobody/no-such-model")


@pytest.fixture(scope="module")
def single_file_alone(tmp_path_factory):
    """A tiny SD 1.x model as one original-layout file, and its configs without a tokenizer: the CLIP tokenizer
    then comes from sdtune's bundled vocabulary (the text encoder has CLIP's 49,408-row table)."""
    from support.testing import save_tiny_pipeline

    from sdtune.export.single_file import pipeline_to_single_file

    root = tmp_path_factory.mktemp("alone")
    folder = save_tiny_pipeline(root / "configs", clip_vocab=True)
    model = load_components(str(folder))
    path = pipeline_to_single_file(model.unet, model.vae, model.text_encoder, root / "model.safetensors")
    for part in ("tokenizer", "unet", "vae", "text_encoder"):  # configs only, as sdtune/archs holds them
        for weights in (folder / part).glob("*.safetensors"):
            weights.unlink()
    shutil.rmtree(folder / "tokenizer")
    return path, folder


def test_a_single_file_trains_samples_and_merges_without_a_tokenizer(single_file_alone, images, tmp_path, tiny_sdxl,
                                                                     monkeypatch):
    """No folder named: the file's architecture picks the bundled configs (here the tiny model's, standing in
    for sdtune/archs/sd15, whose full size the slow test below loads) and CLIP's tokenizer is built."""
    from sdtune.family import archs

    path, configs = single_file_alone
    shutil.copytree(configs, tmp_path / "archs" / "sd15")
    monkeypatch.setattr(archs, "ARCH_ROOT", tmp_path / "archs")
    runner = CliRunner()
    out = tmp_path / "out"
    trained = runner.invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(path), "--set",
                                  "train.method=lora", "--out", str(out), "--max-steps", "2"])
    assert trained.exit_code == 0, trained.output
    assert "model.safetensors: SD 1.x single file (F32, epsilon); configs sd15 (bundled); sdtune's bundled CLIP " \
           "tokenizer (tokenizer)" in trained.output
    sampled = runner.invoke(app, ["sample", "--ckpt", str(out), "--prompt", "a red circle", "--steps", "2",
                                  "--num-images", "1", "--out", str(tmp_path / "samples")])
    assert sampled.exit_code == 0, sampled.output
    assert (tmp_path / "samples" / "grid.png").is_file()
    merged = runner.invoke(app, ["merge", "--ckpt", str(out), "--out", str(tmp_path / "merged"), "--base", str(path),
                                 "--config", str(configs)])
    assert merged.exit_code == 0, merged.output
    assert load_components(str(tmp_path / "merged")).tokenizer("a photo of a cat").input_ids == \
        REFERENCE["a photo of a cat"]
    misfit = runner.invoke(app, ["merge", "--ckpt", str(out), "--out", str(tmp_path / "xl"), "--base", str(tiny_sdxl)])
    assert misfit.exit_code == 2, misfit.output
    lines = misfit.output.strip().splitlines()
    assert len(lines) == 1 and "does not fit the base model" in lines[0], misfit.output


def test_a_named_config_folder_keeps_its_prediction_type_unless_the_file_says_its_own(single_file_alone, tmp_path):
    from safetensors.torch import load_file

    from sdtune.family.load import single_file_parts

    path, configs = single_file_alone
    v_configs = tmp_path / "v"
    shutil.copytree(configs, v_configs)
    scheduler = v_configs / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    _, parts, line = single_file_parts(str(path), str(v_configs))
    assert parts["scheduler"].config.prediction_type == "v_prediction"
    assert "(F32, v_prediction, the configs' prediction type)" in line
    marked = tmp_path / "marked.safetensors"
    save_file(load_file(path), str(marked), {"modelspec.predict_key": "epsilon"})  # the file's own word wins
    _, parts, line = single_file_parts(str(marked), str(v_configs))
    assert parts["scheduler"].config.prediction_type == "epsilon" and "(F32, epsilon)" in line


def test_behind_a_proxy_the_hub_is_not_probed(monkeypatch):
    import socket

    from huggingface_hub import constants

    from sdtune.family import load as models

    def refused(*args, **kwargs):
        raise OSError("no route")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", refused)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    models.hub_online.cache_clear()
    assert models.hub_online() is False  # no proxy, no connection: offline at once
    models.hub_online.cache_clear()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert models.hub_online() is True  # huggingface_hub goes through the proxy; a direct probe would not
    models.hub_online.cache_clear()


def test_merge_config_needs_a_base(single_file_alone, tmp_path):
    result = CliRunner().invoke(app, ["merge", "--ckpt", str(tmp_path), "--out", str(tmp_path / "m"),
                                      "--config", "sd15"])
    assert result.exit_code == 2 and "error:" in result.output


def test_a_ckpt_that_is_neither_a_run_nor_a_model_is_one_line(tmp_path):
    for folder, files in (("run", ("config.toml", "metrics.jsonl")), ("kohya", ("config.toml",))):
        (tmp_path / folder).mkdir()  # a run stopped before its export; a folder with a config.toml of its own
        for name in files:
            (tmp_path / folder / name).write_text("")
    (tmp_path / "notes.txt").write_text("")
    for ckpt, expected in ((tmp_path / "run", "run folder without an exported model"),
                           (tmp_path / "kohya", "not a diffusers pipeline"),
                           (tmp_path / "notes.txt", "neither a diffusers folder nor a .safetensors"),
                           (tmp_path / "missing", "does not exist"), (tmp_path, "not a diffusers pipeline")):
        result = CliRunner().invoke(app, ["sample", "--ckpt", str(ckpt), "--prompt", "x"])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], result.output


@pytest.mark.slow
def test_a_full_size_sd15_file_loads_alone_with_the_bundled_configs(tmp_path):
    """A model-site SD1.5 checkpoint (fp16, random weights, 2.1 GB) with no folder and no network: every tensor
    loads where diffusers' converter puts it, and the prompt is tokenized as CLIP's."""
    from sdtune.export.single_file import arch_weights
    from sdtune.family.load import assemble_pipeline
    from sdtune.sample import generate
    from sdtune.toy.random_pipeline import random_single_file

    path = random_single_file("sd15", tmp_path / "v1-5-pruned-emaonly.safetensors", dtype="float16")
    model = load_components(str(path))
    assert model.origin == ("v1-5-pruned-emaonly.safetensors: SD 1.x single file (F16, epsilon); configs sd15 "
                            "(bundled); sdtune's bundled CLIP tokenizer (tokenizer)")
    assert model.tokenizer("a photo of a cat").input_ids == REFERENCE["a photo of a cat"]
    from safetensors import safe_open

    weights = arch_weights("sd15", model.unet, model.vae, list(model.text_encoders))
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(weights)
        assert all(torch.equal(f.get_tensor(k).float(), weights[k]) for k in f.keys())
    del weights
    image, = generate(assemble_pipeline(model), ["a photo of a cat"], [0], steps=1, height=64, width=64)
    assert image.size == (64, 64)
