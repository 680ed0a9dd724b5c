"""Every cross-key rule of `sdtune.config.rules`, one by one: a config built to break it (and nothing else)
breaks it, is refused where the rule is checked, with one line that names every key of the rule."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from sdtune.config import Config, apply_layers, parse_set
from sdtune.config.rules import RULES, SECTIONS
from sdtune.errors import SdtuneError
from sdtune.plan import resolve_mode
from sdtune.util.world import World

FUSED = ["memory.fused_backward=true", "train.max_grad_norm=0"]
EMBEDDING = ["train.method=embedding", "embedding.token=<sks>"]
# (the rule's keys, the --set items that break it alone, the distributed mode for a launch rule), in RULES' order
EXAMPLES = [
    (("model.init", "model.architecture"), ["model.architecture=sd15"], None),
    (("data.validation_dir", "data.validation_split"), ["data.validation_dir=v", "data.validation_split=0.1"], None),
    (("data.cache_latents", "data.center_crop"), ["data.cache_latents=true", "data.center_crop=false"], None),
    (("data.class_prompt", "data.class_dir"), ["data.class_prompt=a dog"], None),
    (("data.cache_text", "data.shuffle_tags"), ["data.cache_text=true", "data.shuffle_tags=true"], None),
    (("memory.optimizer", "memory.optimizer_offload"), ["memory.optimizer=lion", "memory.optimizer_offload=cpu"],
     None),
    (("memory.fused_backward", "memory.optimizer"), [*FUSED, "memory.optimizer=prodigy"], None),
    (("memory.fused_backward", "memory.precision"), [*FUSED, "memory.precision=fp16"], None),
    (("memory.optimizer_offload", "memory.offload_dir"), ["memory.optimizer_offload=nvme"], None),
    (("memory.param_offload", "memory.gradient_checkpointing"),
     ["memory.param_offload=cpu", "memory.optimizer_offload=cpu"], None),
    (("lora.dora", "lora.algo"), ["lora.dora=true", "lora.algo=loha"], None),
    (("lora.factor", "lora.algo"), ["lora.factor=4"], None),
    (("lora.conv_rank", "lora.target"), ["lora.conv_rank=8"], None),
    (("lora.conv_alpha", "lora.target"), ["lora.conv_alpha=4.5"], None),
    (("lora.dropout", "lora.algo"), ["lora.dropout=0.1", "lora.algo=lokr"], None),
    (("output.sample_every", "output.sample_prompts"), ["output.sample_every=5"], None),
    (("output.sample_at_start", "output.sample_prompts"), ["output.sample_at_start=true"], None),
    (("train.method", "memory.optimizer_offload"), ["train.method=lora", "memory.optimizer_offload=cpu"], None),
    (("memory.param_offload", "memory.optimizer_offload", "train.method"),
     ["memory.param_offload=cpu", "memory.gradient_checkpointing=true"], None),
    (("lora.text_encoder", "train.method"), ["lora.text_encoder=true"], None),
    (("lora.init_from", "train.method"), ["lora.init_from=old/lora.safetensors"], None),
    (("lora.text_encoder", "data.cache_text"), ["lora.text_encoder=true", "train.method=lora", "data.cache_text=true"],
     None),
    (("train.method", "embedding.token"), ["train.method=embedding"], None),
    (("embedding.token", "train.method"), ["embedding.token=<sks>"], None),
    (("train.method", "data.cache_text"), [*EMBEDDING, "data.cache_text=true"], None),
    (("train.method", "memory.optimizer_offload"), [*EMBEDDING, "memory.optimizer_offload=cpu"], None),
    (("train.text_encoder_lr", "train.method"), [*EMBEDDING, "train.text_encoder_lr=1e-5"], None),
    (("output.validate_every", "data.validation_dir", "data.validation_split"), ["output.validate_every=5"], None),
    (("train.text_encoder_lr", "train.method"), ["train.text_encoder_lr=1e-5", "train.method=lora"], None),
    (("train.text_encoder_lr", "data.cache_text"), ["train.text_encoder_lr=1e-5", "data.cache_text=true"], None),
    (("train.text_encoder_lr", "memory.fused_backward"), ["train.text_encoder_lr=1e-5", *FUSED], None),
    (("train.text_encoder_lr", "memory.optimizer_offload"),
     ["train.text_encoder_lr=1e-5", "memory.optimizer_offload=cpu"], None),
    (("memory.fused_backward", "train.max_grad_norm"), ["memory.fused_backward=true"], None),
    (("memory.fused_backward", "train.gradient_accumulation_steps"),
     [*FUSED, "train.gradient_accumulation_steps=2"], None),
    (("memory.fused_backward", "data.class_dir"), [*FUSED, "data.class_dir=c"], None),
    (("memory.distributed", "memory.optimizer_offload"), ["memory.optimizer_offload=cpu"], "ddp"),
    (("memory.distributed", "memory.param_offload"),
     ["train.method=lora", "memory.param_offload=cpu", "memory.gradient_checkpointing=true"], "ddp"),
    (("memory.distributed", "train.method"), ["train.method=lora"], "fsdp"),
    (("memory.distributed", "memory.precision"), ["memory.precision=fp16"], "fsdp"),
    (("memory.distributed", "memory.optimizer"), ["memory.optimizer=lion"], "fsdp"),
    (("memory.distributed", "memory.optimizer_offload"), ["memory.optimizer_offload=nvme", "memory.offload_dir=o"],
     "fsdp"),
    (("memory.distributed", "memory.param_offload"),
     ["memory.param_offload=cpu", "memory.gradient_checkpointing=true", "memory.optimizer_offload=cpu"], "fsdp"),
    (("memory.distributed", "train.ema_decay"), ["train.ema_decay=0.99"], "fsdp"),
    (("memory.distributed", "memory.fused_backward"), FUSED, "ddp"),
    (("memory.distributed", "lora.text_encoder"), ["lora.text_encoder=true", "train.method=lora"], "ddp"),
    (("memory.distributed", "train.method"), EMBEDDING, "ddp"),
    (("memory.distributed", "train.text_encoder_lr"), ["train.text_encoder_lr=1e-5"], "ddp"),
    (("data.cache_text", "data.tag_dropout"), ["data.cache_text=true", "data.tag_dropout=0.1"], None),
    (("data.cache_text", "data.wildcards"), ["data.cache_text=true", "data.wildcards=true"], None),
    (("data.mask_dir", "data.masked_loss"), ["data.mask_dir=masks"], None),
    (("data.class_dir", "data.subsets"), ["data.class_dir=c", "data.subsets=[{dir='r', is_reg=true}]"], None),
    (("memory.fused_backward", "data.subsets"), [*FUSED, "data.subsets=[{dir='r', is_reg=true}]"], None),
    (("train.min_timestep", "train.max_timestep"), ["train.min_timestep=500", "train.max_timestep=500"], None),
    (("train.logit_mean", "train.timestep_sampling"), ["train.logit_mean=0.5"], None),
    (("train.logit_std", "train.timestep_sampling"), ["train.logit_std=2.0"], None),
    (("train.ip_noise_gamma_random_strength", "train.ip_noise_gamma"), ["train.ip_noise_gamma_random_strength=true"],
     None),
    (("train.noise_offset_random_strength", "train.noise_offset"), ["train.noise_offset_random_strength=true"], None),
    (("train.scale_v_pred_loss_like_noise_pred", "train.prediction_type"),
     ["train.scale_v_pred_loss_like_noise_pred=true", "train.prediction_type=epsilon"], None),
    (("train.zero_terminal_snr", "train.prediction_type"),
     ["train.zero_terminal_snr=true", "train.prediction_type=epsilon"], None),
    (("memory.compile", "memory.param_offload"),
     ["memory.compile=blocks", "memory.param_offload=cpu", "memory.gradient_checkpointing=true",
      "memory.optimizer_offload=cpu"], None),
    (("memory.distributed", "memory.compile"), ["memory.compile=blocks"], "ddp"),
]


def _unchecked(items: list[str], mode: str | None) -> SimpleNamespace:
    """The sections of Config() with `items` set, built without any check (what a rule's predicate reads)."""
    sections = {name: {f.name: getattr(getattr(Config(), name), f.name)
                       for f in dataclasses.fields(getattr(Config(), name))} for name in SECTIONS}
    for item in items:
        for name, values in parse_set(item).items():
            sections[name].update({k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    launch = {"mode": mode, "why": f"memory.distributed={mode}"} if mode else {"mode": "none", "why": ""}
    return SimpleNamespace(**{name: SimpleNamespace(**values) for name, values in sections.items()}, **launch)


def test_every_rule_has_an_example():
    assert [keys for keys, _, _ in EXAMPLES] == [rule.keys for rule in RULES]
    assert all(rule.of_launch == (mode is not None) for rule, (_, _, mode) in zip(RULES, EXAMPLES, strict=True))


@pytest.mark.parametrize(("rule", "example"), list(zip(RULES, EXAMPLES, strict=False)),
                         ids=[" ".join(rule.keys) for rule in RULES])
def test_each_rule_refuses_the_config_that_breaks_it_naming_its_keys(rule, example):
    _, items, mode = example
    view = _unchecked(items, mode)
    assert [r.keys for r in RULES if r.broken(view)] == [rule.keys]  # this rule, and no other
    message = rule.message(view)
    assert all(key in message for key in rule.keys) and "\n" not in message, message
    with pytest.raises(SdtuneError) as error:
        if mode:
            cfg = apply_layers(Config(), [(parse_set(item), item) for item in [*items, f"memory.distributed={mode}"]])
            resolve_mode(cfg, World(size=2))
        else:
            apply_layers(Config(), [(parse_set(item), item) for item in items])
    assert str(error.value) == message


def test_a_rule_without_wording_says_its_keys_values_and_fix():
    from sdtune.config.rules import Rule

    rule = Rule(("data.cache_text", "data.shuffle_tags"), lambda c: True, "set one of them the other way")
    view = _unchecked(["data.cache_text=true", "data.shuffle_tags=true"], None)
    assert rule.message(view) == ("data.cache_text=true and data.shuffle_tags=true cannot be used together: "
                                  "set one of them the other way")


@pytest.mark.parametrize("preset, sets, key, planned, needed", [
    ("lora-4gb", ["train.method=embedding", "embedding.token=<sks>"], "data.cache_text", True, False),
    ("sdxl-lora-8gb", ["train.method=lora", "lora.text_encoder=true"], "data.cache_text", True, False),
    ("lora-6gb", ["data.tag_dropout=0.1"], "data.cache_text", True, False),
    ("sdxl-lora-8gb", ["data.shuffle_tags=true"], "data.cache_text", True, False),
    ("rtx3050", ["train.method=embedding", "embedding.token=<sks>"], "memory.optimizer_offload", "cpu", "none"),
    ("sdxl-8gb", ["train.method=lora", "lora.algo=lokr"], "memory.optimizer_offload", "nvme", "none"),
])
def test_a_presets_lever_the_method_cannot_use_gives_way_said_once_and_a_set_of_it_is_refused(
        preset, sets, key, planned, needed, caplog):
    import logging

    from sdtune.config import _say_once, load_config, read_preset
    from sdtune.config.rules import GIVE_WAY

    _say_once.cache_clear()
    section, _, name = key.partition(".")
    assert read_preset(preset)[0][section][name] == planned  # what the preset plans
    caplog.set_level(logging.INFO, logger="sdtune.config")
    for _ in range(2):
        cfg, _ = load_config(preset, sets)
        assert getattr(getattr(cfg, section), name) == needed
    assert sum(f"{key}=" in r.getMessage() and preset in r.getMessage() for r in caplog.records) == 1
    assert any(rule.key == key for rule in GIVE_WAY)
    with pytest.raises(SdtuneError, match=key.replace(".", r"\.")):
        load_config(preset, [*sets, f"{key}={str(planned).lower()}"])
    assert getattr(getattr(load_config(preset)[0], section), name) == planned  # a run the plan serves keeps it
