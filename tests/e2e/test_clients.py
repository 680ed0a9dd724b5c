"""The output folder in the layout every client reads, not only the newest transformers, diffusers and peft:
transformers 4.x loads a text encoder only from `text_model.` keys (others become random weights, with a
warning) and builds its `CLIPTokenizer` only from vocab.json + merges.txt; ComfyUI's DiffusersLoader finds
the CLIP by those keys; diffusers 0.35 with peft 0.17 builds a `LoraConfig` from every field the LoRA
file's metadata stores.

With SDTUNE_OLD_CLIENT_PYTHON naming a python that has transformers 4.x, diffusers 0.35 and peft 0.17 (and
no sdtune), one more test loads what sdtune wrote with those clients' own code.
"""

import json
import os
import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune.export import export_pipeline
from sdtune.export.client_layout import text_model_names
from sdtune.export.lora_files import PEFT_FLOOR_LORA_FIELDS, peft_weights, save_diffusers
from sdtune.family.load import load_components
from sdtune.lora.adapter import TEXT_ENCODER_NAMES, attach

PROMPTS = ["a red circle on the white background", "a photo of a cat, 2girls, café"]


def _keys(path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sdxl"])
def test_exported_text_encoders_have_transformers_4_keys_and_load_whole_in_transformers_5(fixture, tmp_path,
                                                                                       request):
    components = load_components(str(request.getfixturevalue(fixture)))
    out = export_pipeline(components, tmp_path / "out")
    for name, encoder in zip(TEXT_ENCODER_NAMES, components.text_encoders, strict=False):
        keys = _keys(out / name / "model.safetensors")
        assert keys and all(k.startswith("text_model.") or k == "text_projection.weight" for k in keys), name
        loaded, info = type(encoder).from_pretrained(out / name, output_loading_info=True)
        assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        expected, got = encoder.state_dict(), loaded.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k].to(got[k].dtype)) for k in expected), name
    # exported again from that folder (transformers 5 now knows the prefix was there): one prefix, not two
    again = export_pipeline(load_components(str(out)), tmp_path / "again")
    for name in TEXT_ENCODER_NAMES[:len(components.text_encoders)]:
        assert _keys(again / name / "model.safetensors") == _keys(out / name / "model.safetensors")


def _from_files(folder):
    """The tokenizer a transformers 4.x `CLIPTokenizer` builds: vocab.json, merges.txt and the special tokens."""
    from transformers import CLIPTokenizer

    specials = json.loads((folder / "special_tokens_map.json").read_text())
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), **specials)


def test_exported_tokenizers_have_the_vocabulary_files_a_slow_clip_tokenizer_reads(tiny_sdxl, tmp_path):
    components = load_components(str(tiny_sdxl))
    out = export_pipeline(components, tmp_path / "out")
    for name, tokenizer in zip(("tokenizer", "tokenizer_2"), components.tokenizers, strict=True):
        rebuilt = _from_files(out / name)
        assert rebuilt.pad_token == tokenizer.pad_token and len(rebuilt) == len(tokenizer)
        ids = [tokenizer(p, padding="max_length", max_length=tokenizer.model_max_length).input_ids for p in PROMPTS]
        assert [rebuilt(p, padding="max_length", max_length=tokenizer.model_max_length).input_ids
                for p in PROMPTS] == ids


def test_the_bundled_clip_tokenizer_is_written_whole(tmp_path):
    """A single file's model gets CLIP's own tokenizer (49,408 tokens): its files give CLIP's ids."""
    from sdtune.export.client_layout import write_vocabulary_files
    from sdtune.family.clip_tokenizer import OPEN_CLIP_PAD, clip_tokenizer

    tokenizer = clip_tokenizer(OPEN_CLIP_PAD)
    write_vocabulary_files(tokenizer, tmp_path)
    rebuilt = _from_files(tmp_path)
    assert rebuilt("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert rebuilt.pad_token_id == 0 and len(rebuilt) == 49408


def _lora_modules(components):
    """Adapters on the UNet and every text encoder, their B drawn too (peft starts them at zero)."""
    from sdtune.config import LoraConfig

    modules = attach(components.unet, components.text_encoders, LoraConfig(rank=4, alpha=8, text_encoder=True),
                     seed=0)
    torch.manual_seed(1)
    for module in modules.values():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.data.normal_(std=0.1)
    return modules


def test_the_diffusers_lora_file_stores_what_peft_0_17_and_transformers_4_read(tiny_sdxl, tmp_path):
    """Its settings hold only fields peft 0.17's `LoraConfig` has (diffusers builds one from them), its text
    encoders' adapters transformers 4.x's names; the newest diffusers loads every adapter of it as saved."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    components = load_components(str(tiny_sdxl))
    modules = _lora_modules(components)
    path = save_diffusers(modules, components.family, tmp_path)
    with safe_open(str(path), framework="pt") as f:
        metadata, keys = json.loads(f.metadata()["lora_adapter_metadata"]), list(f.keys())
    for part in modules:
        fields = {key.split(".", 1)[1] for key in metadata if key.split(".", 1)[0] == part}
        assert fields and fields <= PEFT_FLOOR_LORA_FIELDS, sorted(fields - PEFT_FLOOR_LORA_FIELDS)
        assert metadata[f"{part}.r"] == 4 and metadata[f"{part}.lora_alpha"] == 8
    assert {k.split(".lora_")[0].split(".")[0] for k in keys} == set(modules)
    assert all(k.startswith("text_model.", len(k.split(".")[0]) + 1) for k in keys if k.startswith("text_encoder"))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(str(tmp_path), adapter_name="saved")
    for part, module in modules.items():
        saved, loaded = peft_weights(module), get_peft_model_state_dict(getattr(pipe, part), adapter_name="saved")
        assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved), part


def test_a_newer_peft_setting_in_use_is_kept():
    """A field older peft lacks is dropped only at its default: one in use must fail there, not load another
    adapter."""
    from peft import LoraConfig

    from sdtune.export.lora_files import floor_lora_config

    if "alora_invocation_tokens" not in LoraConfig().to_dict():
        pytest.skip("this peft has no field newer than 0.17's to try")
    assert "alora_invocation_tokens" not in floor_lora_config(LoraConfig(r=4))
    assert floor_lora_config(LoraConfig(r=4, alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM"))[
        "alora_invocation_tokens"] == [5, 6]


OLD_CLIENT = os.environ.get("SDTUNE_OLD_CLIENT_PYTHON")
OLD_CLIENT_SCRIPT = """
import json, logging, sys, torch, diffusers, transformers, peft
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
folder, lora, ref = sys.argv[1:4]
said = []
class Grab(logging.Handler):
    def emit(self, record):
        said.append(record.getMessage())
logging.getLogger("transformers").addHandler(Grab())
pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
ref = load_file(ref)
weights = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
ids = [pipe.tokenizer(p, padding="max_length", max_length=pipe.tokenizer.model_max_length).input_ids
       for p in json.loads(sys.argv[4])]
pipe.load_lora_weights(lora, weight_name="pytorch_lora_weights.safetensors", adapter_name="saved")
adapters = {f"{part}/{k}": v for part in ("unet", "text_encoder")
            for k, v in get_peft_model_state_dict(getattr(pipe, part), adapter_name="saved").items()}
print(json.dumps({
    "versions": [transformers.__version__, diffusers.__version__, peft.__version__],
    "tokenizer": type(pipe.tokenizer).__name__, "ids": ids,
    "weights_equal": sum(torch.equal(weights[k[3:]], v) for k, v in ref.items() if k.startswith("te/")),
    "adapters_equal": sum(k in adapters and torch.equal(adapters[k], v) for k, v in ref.items() if "/" in k and
                          not k.startswith("te/")),
    "refs": len(ref),
    "warnings": [m[:200] for m in said if "initialized" in m or "not used" in m]}))
"""


@pytest.mark.skipif(not OLD_CLIENT, reason="SDTUNE_OLD_CLIENT_PYTHON names no python with transformers 4.x, "
                                           "diffusers 0.35 and peft 0.17")
def test_transformers_4_diffusers_0_35_peft_0_17_load_the_folder_and_the_lora(tiny_sd1, tmp_path):
    components = load_components(str(tiny_sd1))
    out = export_pipeline(components, tmp_path / "out")
    ref = {f"te/{k.removeprefix('text_model.')}": v.float().contiguous()
           for k, v in components.text_encoder.state_dict().items()}
    modules = _lora_modules(components)
    save_diffusers(modules, components.family, tmp_path)
    for part, module in modules.items():  # named as peft names them in a transformers 4.x model
        ref |= {f"{part}/{k}": v for k, v in text_model_names(module, peft_weights(module)).items()}
    save_file(ref, tmp_path / "ref.safetensors")
    args = [str(out), str(tmp_path), str(tmp_path / "ref.safetensors"), json.dumps(PROMPTS)]
    done = subprocess.run([OLD_CLIENT, "-c", OLD_CLIENT_SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["versions"][0].startswith("4."), seen["versions"]
    assert seen["tokenizer"] == "CLIPTokenizer" and seen["warnings"] == []
    tokenizer = components.tokenizer
    assert seen["ids"] == [tokenizer(p, padding="max_length", max_length=tokenizer.model_max_length).input_ids
                           for p in PROMPTS]
    assert seen["weights_equal"] == sum(k.startswith("te/") for k in ref)
    assert seen["adapters_equal"] == len(ref) - seen["weights_equal"]
