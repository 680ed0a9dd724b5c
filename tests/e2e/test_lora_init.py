"""`lora.init_from`: a LoRA run continues from a LoRA file (sdtune's kohya or diffusers file, another tool's),
on the tiny SD 1.x and SDXL models."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.helpers import prepared, said, train

from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.export.lora_files import peft_weights
from sdtune.train.loop import evaluation_mode

LORA = ("--set", "train.method=lora", "--set", "train.learning_rate=1e-3")
FIRST = (*LORA, "--set", "lora.rank=4", "--set", "lora.alpha=8")
HELD_OUT = ("data.validation_split=0.34", "output.validate_every=2")


def _live(run) -> dict:
    """The run's adapters as a diffusers file names them."""
    return {f"{part}.{key}": value for part, module in run.placement.lora.items()
            for key, value in peft_weights(module).items()}


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sdxl"])
def test_continues_from_its_own_files(fixture, images, tmp_path, request):
    model = request.getfixturevalue(fixture)
    first = tmp_path / "first"
    train(model, images, first, "--max-steps", "2", *FIRST, *(f"--set={s}" for s in HELD_OUT))
    saved = load_file(first / "pytorch_lora_weights.safetensors")
    rows = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    held_out_loss = rows[-1]["validation_loss"]  # at the weights the files hold, on fixed noise and timesteps
    losses = {}
    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        source = first / name
        run = prepared(model, images, tmp_path / f"look-{name}", "train.method=lora", f"lora.init_from={source}",
                       *HELD_OUT)
        assert (run.cfg.lora.rank, run.cfg.lora.scale_alpha) == (4, 8.0)  # the preset's 16 / 16 follow the file
        live = _live(run)
        assert live.keys() == saved.keys() and all(torch.equal(live[k], saved[k]) for k in saved)
        loss = run.validation.evaluate(run, evaluation_mode(run))["validation_loss"]
        assert loss == pytest.approx(held_out_loss, rel=1e-5)  # the second run starts where the first ended
        out = tmp_path / f"second-{name}"
        summary = train(model, images, out, "--max-steps", "2", *LORA, "--set", f"lora.init_from={source}")
        losses[name] = summary["losses"]
        trained = load_file(out / "pytorch_lora_weights.safetensors")
        assert any(not torch.equal(trained[k], saved[k]) for k in saved)  # it trains on from the file's weights
    assert losses["lora.safetensors"] == losses["pytorch_lora_weights.safetensors"]  # the same start, either file


def test_a_folder_and_a_contradicting_set(tiny_sd1, images, tmp_path):
    first = tmp_path / "first"
    train(tiny_sd1, images, first, "--max-steps", "1", *FIRST)
    cfg, _ = load_config("cpu", ["train.method=lora", f"lora.init_from={first}"])
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.target, cfg.lora.text_encoder) == (4, 8.0, "attention", False)
    with pytest.raises(SdtuneError, match=r"^lora.rank=8 but .*pytorch_lora_weights.safetensors holds rank 4 "
                                          r"adapters: drop --set lora.rank"):
        load_config("cpu", ["train.method=lora", f"lora.init_from={first}", "lora.rank=8"])
    assert load_config("cpu", ["train.method=lora", f"lora.init_from={first}", "lora.rank=8", "lora.rank=4"])
    with pytest.raises(SdtuneError, match="lora.init_from continues a LoRA; it needs train.method=lora"):
        load_config("cpu", [f"lora.init_from={first}"])
    with pytest.raises(SdtuneError, match="does not exist"):
        load_config("cpu", ["train.method=lora", f"lora.init_from={tmp_path / 'nothing.safetensors'}"])


def test_a_file_of_another_architecture_is_one_line(tiny_sd1, tiny_sdxl, images, tmp_path):
    first = tmp_path / "first"
    train(tiny_sd1, images, first, "--max-steps", "1", *FIRST)
    with pytest.raises(SdtuneError, match=r"^the LoRA in .* does not fit this model \(.*\): it was trained on "
                                          "another architecture"):
        prepared(tiny_sdxl, images, tmp_path / "xl", "train.method=lora", f"lora.init_from={first}/lora.safetensors")


def test_another_tools_kohya_file_and_mixed_ranks(tiny_sd1, images, tmp_path):
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sdtune.family.load import load_components

    components = load_components(str(tiny_sd1))
    targets = {"unet": ["to_q", "to_k", "to_v", "to_out.0"], "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}
    peft = {}
    for part, module in (("unet", components.unet), ("text_encoder", components.text_encoders[0])):
        module.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets[part], init_lora_weights="gaussian"))
        for name, param in module.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.01)
        level = "text_model." if part == "text_encoder" else ""  # as transformers 4 names it, and kohya
        peft |= {f"{part}.{level}{k.removeprefix('text_model.')}": v.contiguous()
                 for k, v in get_peft_model_state_dict(module).items()}
    kohya = convert_state_dict_to_kohya(peft)  # its text encoder is lora_te1_, which sdtune reads as lora_te_
    peft = {k.replace("text_model.", ""): v for k, v in peft.items()}
    save_file(kohya, tmp_path / "theirs.safetensors")
    run = prepared(tiny_sd1, images, tmp_path / "out", "train.method=lora",
                   f"lora.init_from={tmp_path / 'theirs.safetensors'}")
    assert (run.cfg.lora.rank, run.cfg.lora.scale_alpha, run.cfg.lora.text_encoder) == (2, 2.0, True)
    live = {k.replace("text_model.", ""): v for k, v in _live(run).items()}
    assert live.keys() == peft.keys() and all(torch.equal(live[k], peft[k]) for k in peft)
    halves = {k: v.to(torch.bfloat16 if k.endswith(".alpha") else v.dtype) * (2 if k.endswith(".alpha") else 1)
              for k, v in kohya.items()}  # bf16 alphas of 4: scale 2
    save_file(halves, tmp_path / "bf16.safetensors")
    cfg, _ = load_config("cpu", ["train.method=lora", f"lora.init_from={tmp_path / 'bf16.safetensors'}"])
    assert (cfg.lora.rank, cfg.lora.alpha) == (2, 4.0)
    mixed = dict(kohya)
    first_down = next(k for k in mixed if k.endswith(".lora_down.weight"))
    stem = first_down.removesuffix(".lora_down.weight")
    mixed[first_down], mixed[f"{stem}.lora_up.weight"] = torch.zeros(3, 32), torch.zeros(32, 3)
    save_file(mixed, tmp_path / "mixed.safetensors")
    with pytest.raises(SdtuneError, match=r"holds adapters of ranks \[2, 3\] .*sdtune trains one rank"):
        load_config("cpu", ["train.method=lora", f"lora.init_from={tmp_path / 'mixed.safetensors'}"])


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sdxl"])
def test_text_encoders_and_convolutions_follow_the_file(fixture, images, tmp_path, request):
    model = request.getfixturevalue(fixture)
    first = tmp_path / "first"
    train(model, images, first, "--max-steps", "1", *FIRST, "--set", "lora.text_encoder=true",
          "--set", "lora.target=attention+conv")
    saved = {k.replace("text_model.", ""): v for k, v in load_file(first / "pytorch_lora_weights.safetensors").items()}
    run = prepared(model, images, tmp_path / "look", "train.method=lora", f"lora.init_from={first}/lora.safetensors")
    assert (run.cfg.lora.target, run.cfg.lora.text_encoder) == ("attention+conv", True)
    live = {k.replace("text_model.", ""): v for k, v in _live(run).items()}  # transformers 4 and 5 spellings
    assert any(k.startswith("text_encoder") for k in live) and any(".conv1." in k for k in live)
    assert live.keys() == saved.keys() and all(torch.equal(live[k], saved[k]) for k in saved)
    with pytest.raises(SdtuneError, match="lora.text_encoder=False but .* holds text-encoder adapters"):
        load_config("cpu", ["train.method=lora", f"lora.init_from={first}", "lora.text_encoder=false"])


@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_resume_keeps_the_checkpoint_and_says_the_optimizer_starts_fresh(algo, tiny_sd1, images, tmp_path, caplog):
    import logging
    import shutil

    caplog.set_level(logging.INFO, logger="sdtune")
    first = tmp_path / "first"
    train(tiny_sd1, images, first, "--max-steps", "1", *FIRST, "--set", f"lora.algo={algo}")
    sets = ("--max-steps", "4", *LORA, "--set", f"lora.init_from={first}", "--set", "output.keep_checkpoints=4",
            "--set", "output.checkpoint_every=2")
    prepared(tiny_sd1, images, tmp_path / "look", "train.method=lora", f"lora.init_from={first}")
    assert any("the optimizer state starts fresh and the step at 0" in line for line in said(caplog))
    straight = train(tiny_sd1, images, tmp_path / "straight", *sets)
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "straight", killed)
    shutil.rmtree(killed / "checkpoints" / "step-000004")
    (killed / "summary.json").unlink()
    assert train(tiny_sd1, images, killed, *sets, "--resume")["losses"] == straight["losses"]
