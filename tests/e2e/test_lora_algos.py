"""LoHa, LoKr and DoRA (`lora.algo`, `lora.dora`) and LoCon's conv rank on the tiny SD 1.x, 2.x and SDXL models:
the kohya/LyCORIS file holds exactly the keys the clients read, `sdtune merge` applies it as ComfyUI's formulas
(written out here from docs/design/adapters.md, not from sdtune's code) do, `lora.init_from` reloads it. Their
bitwise resume after SIGKILL is tests/multiprocess/test_reliability.py's, DoRA in plain diffusers
tests/e2e/test_lora.py's."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support.helpers import prepared, runner, train

from sdtune.cli import app
from sdtune.config import load_config
from sdtune.errors import SdtuneError

BASE = ("--set", "train.method=lora", "--set", "lora.rank=4", "--set", "lora.alpha=8", "--set",
        "train.learning_rate=1e-2")
CONV = ("--set", "lora.target=attention+conv", "--set", "lora.conv_rank=2", "--set", "lora.conv_alpha=1")
ALGOS = {
    "dora-conv": ("--set", "lora.dora=true", *CONV),
    "loha-conv": ("--set", "lora.algo=loha", *CONV),
    "lokr": ("--set", "lora.algo=lokr"),
    "lokr-decomposed": ("--set", "lora.algo=lokr", "--set", "lora.rank=2", "--set", "lora.factor=4"),
}
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CONV_NAMES = ("proj_in", "proj_out", "conv1", "conv2", "conv_shortcut")
KEYS = {"lora": {"lora_down.weight", "lora_up.weight", "alpha"},
        "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}}


def comfy_weight(tensors: dict, weight: torch.Tensor) -> torch.Tensor:
    """The weight ComfyUI patches in for one module's file tensors at strength 1 (docs/design/adapters.md,
    "Keys, shapes and formulas")."""
    alpha = tensors["alpha"].item() if "alpha" in tensors else None
    if "lora_up.weight" in tensors:
        up, down = tensors["lora_up.weight"].flatten(1), tensors["lora_down.weight"].flatten(1)
        diff, scale = up @ down, alpha / down.shape[0]
    elif "hada_w1_a" in tensors:
        t = tensors
        diff = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        scale = alpha / t["hada_w1_b"].shape[0]
    else:
        w1 = tensors.get("lokr_w1")
        w1 = w1 if w1 is not None else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
        w2 = tensors.get("lokr_w2")
        w2 = w2 if w2 is not None else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
        rank = tensors["lokr_w2_b"].shape[0] if "lokr_w2_b" in tensors else None
        diff, scale = torch.kron(w1, w2.flatten(1) if w2.dim() > 2 else w2), alpha / rank if rank else 1.0
    patched = weight + scale * diff.reshape(weight.shape)
    if "dora_scale" not in tensors:
        return patched
    norm = weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))  # the ORIGINAL weight's (ComfyUI)
    return patched * tensors["dora_scale"] / norm


def by_module(path) -> dict[str, dict]:
    out = {}
    for key, value in load_file(path).items():
        name, _, suffix = key.partition(".")
        out.setdefault(name, {})[suffix] = value
    return out


def expected_modules(unet, target: str) -> dict[str, torch.nn.Module]:
    """{kohya name: module} of what a run of `target` adapts on a diffusers-named (SD 1.x/2.x) UNet."""
    ends = ATTENTION + (CONV_NAMES if target == "attention+conv" else ())
    return {"lora_unet_" + name.replace(".", "_"): module for name, module in unet.named_modules()
            if name.endswith(tuple("." + end for end in ends)) and hasattr(module, "weight")}


@pytest.mark.parametrize("fixture, algo", [("tiny_sd1", "dora-conv"), ("tiny_sd1", "loha-conv"),
                                           ("tiny_sd2", "lokr"), ("tiny_sd1", "lokr-decomposed")])
def test_the_file_holds_the_clients_keys_and_merge_applies_it_as_comfyui_does(fixture, algo, images, tmp_path,
                                                                              request):
    from diffusers import UNet2DConditionModel

    model = request.getfixturevalue(fixture)
    out, merged = tmp_path / "out", tmp_path / "merged"
    train(model, images, out, "--max-steps", "3", *BASE, *ALGOS[algo])
    name = "dora" if algo.startswith("dora") else algo.split("-")[0]
    assert (out / "pytorch_lora_weights.safetensors").is_file() == (name == "dora")  # diffusers: LoRA, DoRA only
    base = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    conv = "conv" in algo
    wanted = expected_modules(base, "attention+conv" if conv else "attention")
    modules = by_module(out / "lora.safetensors")
    assert modules.keys() == wanted.keys()
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and name.lower() in meta["modelspec.title"].lower()
    assert ('"algo": "lokr"' in meta["ss_network_args"]) == (name == "lokr")
    result = runner.invoke(app, ["merge", "--ckpt", str(out), "--out", str(merged)])
    assert result.exit_code == 0, result.output
    after = dict(UNet2DConditionModel.from_pretrained(merged, subfolder="unet").named_modules())
    paths = {k: n for n, m in base.named_modules() for k, w in wanted.items() if w is m}
    changed = 0
    for key, tensors in modules.items():
        weight = wanted[key].weight.detach()
        if name in KEYS:
            assert set(tensors) == KEYS[name], key
        else:  # no alpha where both factors are full: ComfyUI applies those at scale 1 (alpha / r folded in)
            assert set(tensors) in ({"lokr_w1", "lokr_w2"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}), key
        if name == "loha":
            rank = 2 if key.endswith(tuple(c.replace(".", "_") for c in CONV_NAMES)) else 4
            assert tensors["hada_w1_a"].shape == (weight.shape[0], rank), key
            assert tensors["hada_w2_b"].shape == (rank, weight[0].numel()), key
        if name == "dora":
            assert tensors["dora_scale"].shape == (weight.shape[0], *[1] * (weight.dim() - 1)), key
        want = comfy_weight(tensors, weight)
        got = after[paths[key]].weight.detach()
        scale = (want - weight).abs().max().item()
        changed += scale > 1e-4
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * max(1.0, weight.abs().max().item()), msg=key)
    assert changed > len(modules) // 2  # the training moved the weights the merge changes
    if name == "dora":
        _check_dora_at_half_strength(out, base, tmp_path / "half")
    if algo == "lokr-decomposed":
        assert any("lokr_w2_a" in t for t in modules.values())


def _check_dora_at_half_strength(out, base, merged):
    """`sdtune merge --lora-scale 0.5` of a DoRA run: m x (W + 0.5 s up @ down) / its row norms, from the
    diffusers file's peft tensors (peft's and diffusers' meaning of a scale; ComfyUI's strength differs)."""
    from diffusers import UNet2DConditionModel

    result = runner.invoke(app, ["merge", "--ckpt", str(out), "--out", str(merged), "--lora-scale", "0.5"])
    assert result.exit_code == 0, result.output
    after = dict(UNet2DConditionModel.from_pretrained(merged, subfolder="unet").named_modules())
    peft = load_file(out / "pytorch_lora_weights.safetensors")
    stems = {k.removesuffix(".lora_A.weight").removeprefix("unet.") for k in peft if k.endswith(".lora_A.weight")}
    for stem in stems:
        weight = base.get_submodule(stem).weight.detach()
        down, up = peft[f"unet.{stem}.lora_A.weight"], peft[f"unet.{stem}.lora_B.weight"]
        scale = (1 / 2) if stem.endswith(CONV_NAMES) else (8 / 4)  # conv_alpha / conv_rank, alpha / rank
        patched = weight + 0.5 * scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        rows = (-1, *[1] * (weight.dim() - 1))
        magnitude = peft[f"unet.{stem}.lora_magnitude_vector"].reshape(rows)
        want = magnitude * patched / patched.flatten(1).norm(dim=1).reshape(rows)
        torch.testing.assert_close(after[stem].weight.detach(), want, rtol=0, atol=1e-5, msg=stem)


@pytest.mark.parametrize("algo", ["loha-conv", "lokr", "dora-conv"])
def test_init_from_reloads_the_file_into_the_same_weights(algo, tiny_sd1, images, tmp_path):
    first = tmp_path / "first"
    train(tiny_sd1, images, first, "--max-steps", "2", *BASE, *ALGOS[algo])
    trained = load_file(first / "checkpoints" / "step-000002" / "lora.safetensors")
    run = prepared(tiny_sd1, images, tmp_path / "look", "train.method=lora",
                   f"lora.init_from={first / 'lora.safetensors'}")
    lora = run.cfg.lora
    assert (lora.algo, lora.dora, lora.rank, lora.scale_alpha) == (
        "lora" if algo.startswith("dora") else algo.split("-")[0], algo.startswith("dora"), 4, 8.0)
    assert (lora.target, lora.conv_rank, lora.conv_alpha) == (("attention+conv", 2, 1.0) if "conv" in algo else
                                                              ("attention", 0, 0.0))
    live = run.placement.weights()
    assert live.keys() == trained.keys()
    for key, value in trained.items():
        if "magnitude" in key:  # DoRA's kohya dora_scale is rescaled for ComfyUI: back to m to fp32 rounding
            torch.testing.assert_close(live[key], value, rtol=1e-6, atol=0)
        else:
            assert torch.equal(live[key], value), key
    run.placement.close()
    if algo.startswith("dora"):  # the diffusers file keeps peft's magnitudes: exact
        run = prepared(tiny_sd1, images, tmp_path / "look2", "train.method=lora", f"lora.init_from={first}")
        assert all(torch.equal(run.placement.weights()[k], v) for k, v in trained.items())
        run.placement.close()


def test_a_loha_file_into_a_lora_run_and_dora_with_lycoris_are_one_line(tiny_sd1, images, tmp_path):
    first = tmp_path / "first"
    train(tiny_sd1, images, first, "--max-steps", "1", *BASE, *ALGOS["loha-conv"])
    cfg, _ = load_config("cpu", ["train.method=lora", f"lora.init_from={first}"])
    assert (cfg.lora.algo, cfg.lora.conv_rank) == ("loha", 2)
    with pytest.raises(SdtuneError, match=r"^lora.algo=lora but .*lora.safetensors holds loha adapters: drop "
                                          r"--set lora.algo"):
        load_config("cpu", ["train.method=lora", f"lora.init_from={first}", "lora.algo=lora"])
    with pytest.raises(SdtuneError, match=r"^lora.dora=true and lora.algo=lokr cannot be used together: .*"
                                          r"lycoris-lora has it"):
        load_config("cpu", ["train.method=lora", "lora.algo=lokr", "lora.dora=true"])
    tucker = load_file(first / "lora.safetensors")
    conv = next(k for k in tucker if "conv1.hada_w1_a" in k).removesuffix(".hada_w1_a")
    tucker[f"{conv}.hada_t1"] = torch.zeros(2, 2, 3, 3)  # LyCORIS' Tucker core: not what peft trains
    save_file(tucker, tmp_path / "tucker.safetensors")
    with pytest.raises(SdtuneError, match=r"^lora.init_from=.* holds hada_t1 weights .*sdtune does not train"):
        load_config("cpu", ["train.method=lora", f"lora.init_from={tmp_path / 'tucker.safetensors'}"])


def test_sdxl_loha_with_both_text_encoders_merges_and_samples(tiny_sdxl, images, tmp_path):
    """SDXL: SGM names and both encoders' `lora_te1_`/`lora_te2_` in the file; merge changes what they adapt."""
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "out"
    train(tiny_sdxl, images, out, "--max-steps", "2", *BASE, "--set", "lora.algo=loha", "--set",
          "lora.text_encoder=true")
    modules = by_module(out / "lora.safetensors")
    assert {k.split("_")[1] for k in modules} == {"unet", "te1", "te2"}
    assert any("input_blocks" in k for k in modules) and all(set(t) == KEYS["loha"] for t in modules.values())
    result = runner.invoke(app, ["merge", "--ckpt", str(out), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    base, merged = (StableDiffusionXLPipeline.from_pretrained(p) for p in (tiny_sdxl, tmp_path / "merged"))
    for part in ("unet", "text_encoder", "text_encoder_2"):
        before, after = getattr(base, part).state_dict(), getattr(merged, part).state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed and all(any(t in k for t in ("to_", "_proj")) for k in changed), part
    result = runner.invoke(app, ["sample", "--ckpt", str(out), "--prompt", "a red circle", "--num-images", "1",
                                 "--steps", "2", "--lora-scale", "0.5", "--out", str(tmp_path / "samples")])
    assert result.exit_code == 0, result.output
