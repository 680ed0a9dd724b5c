"""The LDM single-file export: diffusers' own loader reads it back bit-exactly; the key layout is SD1.5's."""

import pytest
import torch

from sdtune.export.single_file import (
    UNET_PREFIX,
    VAE_PREFIX,
    pipeline_to_single_file,
    text_encoder_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
from sdtune.family.load import BUNDLED

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny SD1 pipeline folder and the pipeline loaded from it."""
    from diffusers import StableDiffusionPipeline
    from support.testing import save_tiny_pipeline

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

    def broken_save(tensors, filename, dtype=None, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("sdtune.export.streamed.write_streamed", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pipeline_to_single_file(pipe.unet, pipe.vae, pipe.text_encoder, path)
    assert list(tmp_path.iterdir()) == [path] and load_file(str(path)).keys() == tensors.keys()


# --- SD 2.x, SDXL and the entry point the export calls -------------------------------------------------------

def _equal_to_fp16(original: dict, reloaded: dict) -> list[str]:
    """Keys whose reloaded tensor is not the original rounded to fp16 (the file's precision)."""
    return [k for k in original if not torch.equal(reloaded[k].half(), original[k].half())]


def _assert_round_trip(pipe, loaded, names):
    for name in names:
        original, reloaded = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert reloaded.keys() == original.keys(), name
        unequal = _equal_to_fp16(original, reloaded)
        assert not unequal, f"{name}: {unequal[:5]}"


def test_sdxl_round_trip_in_the_sgm_layout(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from sdtune.export.single_file import write_single_file

    folder, pipe = tiny_sdxl, StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    result = write_single_file(tmp_path / "xl.safetensors", unet=pipe.unet, vae=pipe.vae, text_encoders=encoders,
                               prediction_type="epsilon", dtype=torch.float16, force=True)
    assert result.path == tmp_path / "xl.safetensors" and "GroupNorm" in result.notes[-1]
    g = "conditioner.embedders.1.model."
    with safe_open(str(result.path), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert {k.split(".")[0] for k in shapes} == {"model", "first_stage_model", "conditioner"}
    assert shapes[UNET_PREFIX + "label_emb.0.0.weight"] == list(pipe.unet.add_embedding.linear_1.weight.shape)
    assert shapes[UNET_PREFIX + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"] == [64, 80]
    assert shapes[g + "transformer.resblocks.2.attn.in_proj_weight"] == [3 * 48, 48]
    assert shapes[g + "text_projection"] == [48, 32]  # [width, projection]: HF's Linear weight transposed
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_ids" in shapes
    assert "v_pred" not in shapes

    loaded = StableDiffusionXLPipeline.from_single_file(str(result.path), config=str(folder), local_files_only=True)
    _assert_round_trip(pipe, loaded, ("unet", "vae", "text_encoder", "text_encoder_2"))

    v = write_single_file(tmp_path / "xl-v.safetensors", unet=pipe.unet, vae=pipe.vae, text_encoders=encoders,
                          prediction_type="v_prediction", force=True)
    with safe_open(str(v.path), "pt") as f:
        assert "v_pred" in f.keys() and f.metadata()["modelspec.predict_key"] == "v"
    assert "read for SDXL" in v.notes[0]


def test_sd2_round_trip_in_the_open_clip_layout_with_the_v_prediction_marker(tiny_sd2, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from sdtune.export.single_file import write_single_file

    kwargs = dict(safety_checker=None, requires_safety_checker=False, local_files_only=True)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd2, **kwargs)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    result = write_single_file(tmp_path / "sd2.safetensors", unet=pipe.unet, vae=pipe.vae,
                               text_encoders=[pipe.text_encoder], prediction_type="v_prediction",
                               dtype=torch.float16, force=True)
    with safe_open(str(result.path), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        assert f.get_slice("v_pred").get_shape() == [0]  # ComfyUI's marker: an empty tensor
        assert f.get_slice("cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias").get_shape() == [96]
    assert metadata["modelspec.predict_key"] == "v"
    assert "cond_stage_model.model.token_embedding.weight" in keys and "cond_stage_model.model.ln_final.bias" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    assert any("v-prediction" in note and "SD 2.x" in note for note in result.notes)

    loaded = StableDiffusionPipeline.from_single_file(str(result.path), config=str(tiny_sd2), **kwargs)
    _assert_round_trip(pipe, loaded, ("unet", "vae", "text_encoder"))


def test_sd1_entry_point_refuses_the_tiny_model_and_force_writes_the_same_keys(tiny, tmp_path):
    from safetensors import safe_open

    from sdtune.export.single_file import write_single_file

    _, pipe = tiny
    parts = dict(unet=pipe.unet, vae=pipe.vae, text_encoders=[pipe.text_encoder], prediction_type="epsilon")
    refused = write_single_file(tmp_path / "a.safetensors", **parts)
    assert refused.path is None and "GroupNorm with 8 groups" in refused.reason and "VAE" in refused.reason
    assert "\n" not in refused.reason and list(tmp_path.iterdir()) == []

    written = write_single_file(tmp_path / "a.safetensors", **parts, force=True)
    old = pipeline_to_single_file(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / "b.safetensors")
    with safe_open(str(written.path), "pt") as a, safe_open(str(old), "pt") as b:
        assert set(a.keys()) == set(b.keys()) and a.metadata()["modelspec.predict_key"] == "epsilon"
    assert written.reason == "" and len(written.notes) == 1  # only: written although clients cannot read it


def _published(arch: str):
    """The bundled published UNet, VAE and text encoders of `arch`, on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdtune.export.clients import CLIP_L, OPENCLIP_BIGG
    from sdtune.family import archs

    unet, vae = archs.build_model(arch, "unet"), archs.build_model("sd15", "vae")
    if arch != "sdxl":
        return unet, vae, [archs.build_model(arch, "text_encoder")]
    with torch.device("meta"):
        return unet, vae, [CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                           CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG, projection_dim=1280))]


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_published_sizes_are_readable(arch):
    from sdtune.export.clients import unreadable_reason
    from sdtune.family import architecture_of

    unet, vae, encoders = _published(arch)
    assert architecture_of(unet, encoders) == arch
    assert unreadable_reason(arch, unet, vae, encoders, "v_prediction") is None


def test_other_sizes_groups_and_prediction_types_are_not_readable():
    from diffusers import UNet2DConditionModel

    from sdtune.export.clients import unreadable_reason
    from sdtune.family import architecture_of, archs

    unet, vae, encoders = _published("sd15")
    with torch.device("meta"):
        wide = UNet2DConditionModel.from_config({**unet.config, "cross_attention_dim": 1024})
    reason = unreadable_reason("sd15", wide, vae, encoders)
    assert "cross_attention_dim is 1024, not SD 1.x's published 768" in reason
    assert "sample it as epsilon" in unreadable_reason("sd15", unet, vae, encoders, "sample")

    tiny = BUNDLED["sdtune-tiny"]  # sdtune's bundled tiny model
    tiny_unet = archs.build_part(tiny / "unet", "diffusers", "UNet2DConditionModel")
    tiny_vae = archs.build_part(tiny / "vae", "diffusers", "AutoencoderKL")
    tiny_clip = archs.build_part(tiny / "text_encoder", "transformers", "CLIPTextModel")
    assert architecture_of(tiny_unet, [tiny_clip]) == "sd15"
    assert "UNet has GroupNorm with 16 groups" in unreadable_reason("sd15", tiny_unet, tiny_vae, [tiny_clip])
    assert architecture_of(unet, encoders * 2) is None  # two encoders without SDXL's text_time conditioning


def test_unknown_family_is_a_reason_not_a_file(tiny, tmp_path):
    from sdtune.export.single_file import write_single_file

    _, pipe = tiny
    result = write_single_file(tmp_path / "x.safetensors", unet=pipe.unet, vae=pipe.vae,
                               text_encoders=[pipe.text_encoder] * 2, prediction_type="epsilon", force=True)
    assert result.path is None and result.reason.startswith("no original single-file layout")


def test_full_size_sdxl_file_has_the_shapes_the_clients_detect():
    from sdtune.export.single_file import arch_weights

    unet, vae, encoders = _published("sdxl")
    shapes = {k: tuple(v.shape) for k, v in arch_weights("sdxl", unet, vae, encoders).items()}
    # ComfyUI: adm_in_channels, context_dim and transformer depth [0, 0, 2, 2, 10, 10] -> SDXL
    assert shapes[UNET_PREFIX + "label_emb.0.0.weight"] == (1280, 2816)
    assert shapes[UNET_PREFIX + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"] == (640, 2048)
    assert UNET_PREFIX + "input_blocks.7.1.transformer_blocks.9.attn1.to_q.weight" in shapes
    assert UNET_PREFIX + "input_blocks.7.1.transformer_blocks.10.attn1.to_q.weight" not in shapes
    assert shapes[UNET_PREFIX + "middle_block.1.proj_in.weight"] == (1280, 1280)  # linear projection
    # A1111 and diffusers: the OpenCLIP-bigG tower's keys mark the file as SDXL base
    g = "conditioner.embedders.1.model."
    assert shapes[g + "ln_final.weight"] == (1280,)
    assert g + "transformer.resblocks.31.mlp.c_proj.bias" in shapes and shapes[g + "text_projection"] == (1280, 1280)
    assert shapes[g + "transformer.resblocks.0.attn.in_proj_weight"] == (3840, 1280)
    assert sum(k.startswith(g) for k in shapes) == 32 * 12 + 5  # resblocks, embeddings, ln_final, projection


def test_open_clip_layout_packs_q_k_v_in_order_and_raises_on_strangers():
    from sdtune.export.openclip import text_model_to_open_clip

    q, k, v, w = torch.full((2, 2), 1.0), torch.full((2, 2), 2.0), torch.full((2, 2), 3.0), torch.arange(6.0)
    layer = "text_model.encoder.layers.0.self_attn."
    out = text_model_to_open_clip({layer + "q_proj.weight": q, layer + "k_proj.weight": k,
                                   layer + "v_proj.weight": v, "text_projection.weight": w.reshape(3, 2),
                                   "text_model.embeddings.position_ids": torch.arange(3)}, "p.")
    assert torch.equal(out["p.transformer.resblocks.0.attn.in_proj_weight"], torch.cat([q, k, v]))
    assert torch.equal(out["p.text_projection"], w.reshape(3, 2).t()) and len(out) == 2
    with pytest.raises(ValueError, match="cannot map"):
        text_model_to_open_clip({"text_model.encoder.layers.0.extra.weight": q}, "p.")
    with pytest.raises(ValueError, match="q, k and v"):
        text_model_to_open_clip({layer + "q_proj.weight": q}, "p.")


def test_the_streamed_file_is_byte_for_byte_what_safetensors_writes(tiny, tmp_path):
    """`save_single_file` casts and writes one tensor at a time; the file is the one safetensors' `save_file`
    writes of the whole cast dict: the same header (tensor order, dtypes, offsets, metadata) and bytes. Metadata
    that is not text is refused, as `save_file` refuses it, rather than written into a file no reader opens."""
    from safetensors.torch import save_file

    from sdtune.export.single_file import arch_weights, save_single_file

    _, pipe = tiny
    weights = arch_weights("sd15", pipe.unet, pipe.vae, [pipe.text_encoder])
    weights.update(v_pred=torch.zeros(0), step=torch.tensor(7), half=torch.ones(3, dtype=torch.bfloat16),
                   mask=torch.tensor([True, False]), codes=torch.arange(5, dtype=torch.uint8))
    metadata = {"modelspec.predict_key": "v", "z": "é \"quoted\""}
    for dtype in (torch.float16, torch.bfloat16, None):
        cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                for k, v in weights.items()}
        save_file(cast, tmp_path / "library.safetensors", metadata={"format": "pt", **metadata})
        ours = save_single_file(weights, tmp_path / "ours.safetensors", dtype, metadata)
        assert _parts(ours) == _parts(tmp_path / "library.safetensors"), dtype
    with pytest.raises(ValueError, match="strings only"):
        save_single_file(weights, tmp_path / "bad.safetensors", None, {"steps": 7})
    assert not list(tmp_path.glob("*bad*"))


def _parts(path):
    """A safetensors file's header (as JSON; safetensors orders the metadata as its hash map comes), the
    order of its tensors, and its data bytes."""
    import json

    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    return header, list(header), raw[8 + size:]


def test_writing_a_single_file_holds_no_second_copy_of_the_model(tiny, tmp_path, monkeypatch):
    """The fp32 model written in fp16: while the file is written, the tensors alive besides the model's own
    are at most one converted tensor (a cast of the whole model first would hold half the model more)."""
    import gc

    from sdtune.export import streamed
    from sdtune.export.single_file import write_single_file

    _, pipe = tiny
    parts = (pipe.unet, pipe.vae, pipe.text_encoder)

    def live_bytes() -> int:
        storages = {}
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    largest = max(t.numel() for part in parts for t in part.state_dict().values()) * 2
    seen, written = [], []
    write = streamed.write_streamed

    def measured(tensors, path, dtype=None, metadata=None):
        real_open = open

        def counting_open(*args, **kwargs):  # sample the live bytes at the last tensor's write
            handle = real_open(*args, **kwargs)
            original = handle.write

            def write_part(data):
                written.append(len(data))
                if len(written) == len(tensors) // 2:
                    seen.append(live_bytes())
                return original(data)

            handle.write = write_part
            return handle

        monkeypatch.setattr("builtins.open", counting_open)
        try:
            return write(tensors, path, dtype, metadata)
        finally:
            monkeypatch.setattr("builtins.open", real_open)

    gc.collect()
    before = live_bytes()
    monkeypatch.setattr(streamed, "write_streamed", measured)
    result = write_single_file(tmp_path / "m.safetensors", unet=pipe.unet, vae=pipe.vae,
                               text_encoders=[pipe.text_encoder], prediction_type="epsilon", dtype=torch.float16,
                               force=True)
    assert result.path is not None and seen
    model = sum(t.numel() * t.element_size() for part in parts for t in part.state_dict().values())
    assert seen[0] - before <= largest + 2**16, (seen[0] - before, model // 2)

def _assert_reads_as_loaded(source, config, expected: dict, dtype=torch.float32):
    """`load_components(..., meta_unet=True)` (FSDP's load) builds the UNet on the meta device and reads any
    rows of any weight as the ordinary load holds them (cast through the file's dtype)."""
    from sdtune.family.load import load_components

    components = load_components(str(source), config=str(config), meta_unet=True)
    assert all(p.is_meta for p in components.unet.parameters())
    weights = components.unet_weights
    assert weights is not None and set(weights.keys) == set(expected)
    for name, tensor in expected.items():
        rows = tensor.shape[0]
        start, stop = rows // 3, rows // 3 + (rows + 1) // 2  # a middle run of rows, as a rank's shard
        assert torch.equal(weights.read(name, start, stop), tensor[start:stop].to(dtype).float()), name
    assert weights.elements < sum(t.numel() for t in expected.values())  # what was asked, not the whole UNet


def test_fsdp_reads_a_folders_or_single_files_unet_rows_as_the_ordinary_load_holds_them(tiny, tmp_path):
    folder, pipe = tiny
    expected = pipe.unet.state_dict()
    _assert_reads_as_loaded(folder, "", expected)
    path = pipeline_to_single_file(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / "tiny.safetensors",
                                   dtype=torch.float16)
    _assert_reads_as_loaded(path, folder, expected, torch.float16)


def test_fsdp_reads_an_sdxl_single_files_unet_by_its_sgm_names(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from sdtune.export.single_file import write_single_file

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    result = write_single_file(tmp_path / "xl.safetensors", unet=pipe.unet, vae=pipe.vae,
                               text_encoders=[pipe.text_encoder, pipe.text_encoder_2], prediction_type="epsilon",
                               force=True)
    _assert_reads_as_loaded(result.path, tiny_sdxl, pipe.unet.state_dict())


def test_fsdp_reads_a_unet_saved_in_several_files_under_their_index(tiny, tmp_path):
    from sdtune.family.slices import UnetWeights, folder_keys

    _, pipe = tiny
    pipe.unet.save_pretrained(tmp_path / "unet", max_shard_size="200KB")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    weights = UnetWeights(folder_keys(tmp_path / "unet"))
    assert len(weights.files) > 1
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(weights.read(name, 0, tensor.shape[0]), tensor), name


@pytest.mark.parametrize("shards", [False, True])
def test_fsdp_reads_the_shards_of_a_hub_model_whose_cache_holds_nothing_yet(tiny, tmp_path, monkeypatch, shards):
    """A hub model's first run: its UNet's weights (one file, or the files of its index) are fetched with its
    config, so each rank reads its rows instead of every rank loading the whole UNet."""
    import shutil

    from huggingface_hub.errors import LocalEntryNotFoundError

    from sdtune.family import load

    folder, pipe = tiny
    repo = tmp_path / "repo"  # what the hub serves
    shutil.copytree(folder, repo)
    if shards:
        shutil.rmtree(repo / "unet")
        pipe.unet.save_pretrained(repo / "unet", max_shard_size="200KB")

    def hub_file(repo_id, name):  # hf_hub_download: one file into the local snapshot
        if not (repo / name).is_file():
            raise LocalEntryNotFoundError(name)
        (tmp_path / "snapshot" / name).parent.mkdir(parents=True, exist_ok=True)
        return str(shutil.copy(repo / name, tmp_path / "snapshot" / name))

    monkeypatch.setattr(load, "_hub_file", hub_file)
    unet, weights = load._meta_unet("someone/tiny-sd", "hub", "")
    assert unet is not None and all(p.is_meta for p in unet.parameters())
    assert (len(weights.files) > 1) == shards
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(weights.read(name, 0, tensor.shape[0]), tensor), name
