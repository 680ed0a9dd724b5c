"""The LDM single-file export: diffusers' own loader reads it back bit-exactly; the key layout is SD1.5's."""

import pytest
import torch

from sdtune.single_file import (
    UNET_PREFIX,
    VAE_PREFIX,
    pipeline_to_single_file,
    text_encoder_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny SD1 pipeline folder and the pipeline loaded from it."""
    from diffusers import StableDiffusionPipeline

    from sdtune.toy.testing import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd1", version=1)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    return folder, pipe


def sd15_unet():
    """The real SD1.5 UNet architecture, on the meta device: keys and shapes, no memory."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )


def test_diffusers_from_single_file_reloads_every_tensor_exactly(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    folder, pipe = tiny
    target = tmp_path / "out" / "tiny.safetensors"
    path = pipeline_to_single_file(pipe.unet, pipe.vae, pipe.text_encoder, target)
    assert path == target and list(path.parent.iterdir()) == [path]

    originals = {name: getattr(pipe, name).state_dict() for name in ("unet", "vae", "text_encoder")}
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice(VAE_PREFIX + "encoder.mid.attn_1.q.weight").get_shape() == [32, 32, 1, 1]
    # one file key per model tensor, plus CLIP's position_ids buffer, which SD1 files carry
    assert len(keys) == sum(len(sd) for sd in originals.values()) + 1
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}

    loaded = StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True,
        safety_checker=None, requires_safety_checker=False,
    )
    for name, original in originals.items():
        reloaded = getattr(loaded, name).state_dict()
        assert reloaded.keys() == original.keys(), name
        unequal = [k for k in original if not torch.equal(reloaded[k], original[k])]
        assert not unequal, f"{name}: {unequal[:5]}"


def test_sd15_unet_converts_to_the_sd15_checkpoint_key_set():
    unet = sd15_unet()
    ldm = unet_to_ldm(unet.state_dict(), unet.config)
    # 686 = the UNet keys of the v1-5 checkpoint (and of every SD1.x LDM file), one per diffusers tensor
    assert len(ldm) == 686 and all(k.startswith(UNET_PREFIX) for k in ldm)
    shapes = {k[len(UNET_PREFIX):]: tuple(v.shape) for k, v in ldm.items()}
    expected = {
        "time_embed.0.weight": (1280, 320),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "middle_block.2.emb_layers.1.weight": (1280, 1280),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "out.2.weight": (4, 320, 3, 3),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    no_such_blocks = ("input_blocks.12.", "output_blocks.11.2.", "output_blocks.12.")
    assert not any(k.startswith(no_such_blocks) for k in shapes)


def test_sd_vae_converts_to_the_sd_checkpoint_key_set():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
    ldm = {k[len(VAE_PREFIX):]: tuple(v.shape) for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}
    assert len(ldm) == 248  # the first_stage_model keys of an SD1.x checkpoint
    assert ldm["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)  # decoder levels count upwards
    assert ldm["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert ldm["encoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in ldm
    assert "encoder.down.3.downsample.conv.weight" not in ldm


def test_unmappable_keys_raise_instead_of_vanishing():
    unet = sd15_unet()
    weight = torch.empty(1, device="meta")
    for bad in ("class_embedding.linear_1.weight", "down_blocks.0.resnets.0.extra.weight",
                "down_blocks.3.downsamplers.0.conv.weight", "up_blocks.3.upsamplers.0.conv.weight"):
        with pytest.raises(ValueError, match="cannot map"):
            unet_to_ldm({**unet.state_dict(), bad: weight}, unet.config)
    with pytest.raises(ValueError, match="cannot map"):
        vae_to_ldm({"encoder.mid_block.attentions.0.query.weight": weight},
                   {"block_out_channels": (8, 16), "layers_per_block": 1})


def test_text_encoder_is_sd1_clip_only():
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):  # SD1's CLIP ViT-L/14 text encoder
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            projection_dim=768, hidden_act="quick_gelu"))
    ldm = text_encoder_to_ldm(clip.state_dict(), clip.config)
    assert len(ldm) == 197  # the cond_stage_model keys of an SD1.x checkpoint, position_ids included
    prefix = "cond_stage_model.transformer.text_model."
    assert ldm[prefix + "embeddings.position_ids"].shape == (1, 77)
    assert ldm[prefix + "encoder.layers.11.mlp.fc2.weight"].shape == (768, 3072)

    weight = torch.zeros(2)
    assert text_encoder_to_ldm({"final_layer_norm.weight": weight}) == {
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": weight}
    assert list(text_encoder_to_ldm({"text_model.final_layer_norm.weight": weight})) == [
        "cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    with pytest.raises(ValueError, match="SD1"):
        text_encoder_to_ldm({"text_projection.weight": weight})  # SDXL's second encoder
    with pytest.raises(ValueError, match="SD1"):
        text_encoder_to_ldm({}, CLIPTextConfig(hidden_act="gelu"))  # SD2's OpenCLIP


def test_dtype_cast_and_failed_write_leaves_old_file(tiny, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    _, pipe = tiny
    path = pipeline_to_single_file(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / "m.safetensors",
                                   dtype=torch.float16)
    tensors = load_file(str(path))
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pipeline_to_single_file(pipe.unet, pipe.vae, pipe.text_encoder, path)
    assert list(tmp_path.iterdir()) == [path] and load_file(str(path)).keys() == tensors.keys()
