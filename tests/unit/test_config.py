
import pytest

from sdtune.config import load_config, parse_set, preset_names
from sdtune.config.toml import from_toml, to_toml
from sdtune.errors import SdtuneError


def test_shipped_presets_all_validate_and_round_trip():
    assert set(preset_names()) >= {"rtx2070", "rtx3050", "rtx3080", "rtx4090", "cpu"}
    for name in preset_names():
        cfg, info = load_config(name)
        assert info.card and info.description
        assert from_toml(to_toml(cfg, info), name) == cfg


def test_eight_gib_presets_use_the_memory_levers():
    for name in ("rtx2070", "rtx3050"):
        cfg, info = load_config(name)
        assert info.vram_gib == 8
        assert cfg.memory.gradient_checkpointing and cfg.memory.optimizer_offload == "cpu"
    assert load_config("rtx2070")[0].memory.precision == "fp16"  # Turing has no bf16


def test_every_preset_key_has_a_comment():
    from sdtune.config import preset_path

    for name in preset_names():
        for line in preset_path(name).read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                assert "  # " in line, f"{name}: {line!r} has no comment"


def test_set_overrides_are_typed():
    cfg, _ = load_config("cpu", ["train.max_steps=7", "train.learning_rate=3e-4", "memory.precision=bf16",
                                 "model.pretrained=./some/path", "output.sample_prompts=['a', 'b']"])
    assert cfg.train.max_steps == 7 and cfg.train.learning_rate == 3e-4
    assert cfg.memory.precision == "bf16" and cfg.model.pretrained == "./some/path"
    assert cfg.output.sample_prompts == ("a", "b")
    # a string key keeps the text even when it would parse as another TOML type
    assert parse_set("model.pretrained=123") == {"model": {"pretrained": "123"}}


def test_rules_between_keys_see_all_overrides_whatever_their_order():
    cfg, _ = load_config("cpu", ["output.sample_every=5", "output.sample_prompts=['a']",
                                 "train.lr_warmup_steps=300", "train.max_steps=400"])
    assert cfg.output.sample_every == 5 and cfg.train.lr_warmup_steps == 300


@pytest.mark.parametrize("item, words", [
    ("train.max_step=5", ["train.max_step", "did you mean 'train.max_steps'"]),
    ("train.max_steps=abc", ["train.max_steps", "integer"]),
    ("train.max_steps=true", ["train.max_steps", "integer"]),
    ("memory.precision=fp8", ["memory.precision", "fp32, bf16, fp16"]),
    ("trian.seed=1", ["[trian]", "[train]"]),
    ("max_steps", ["section.key=value"]),
    ("train.max_steps=0", ["train.max_steps", "at least 1"]),
])
def test_bad_overrides_name_the_key(item, words):
    with pytest.raises(SdtuneError) as err:
        load_config("cpu", [item])
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("preset", preset_names())
def test_max_steps_1_is_accepted_by_every_preset_with_the_warmup_cut_to_it(preset):
    """kohya's habit: `--max-steps 1` to try a setup; the GPU presets' 100-step warm-up once refused it."""
    cfg, _ = load_config(preset, ["train.max_steps=1"])
    assert cfg.train.warmup_steps == min(1, cfg.train.lr_warmup_steps)
    assert load_config("cpu", ["train.max_steps=10", "train.lr_warmup_steps=20"])[0].train.warmup_steps == 10


def test_contradictions_name_both_keys():
    with pytest.raises(SdtuneError, match="output.sample_every.*output.sample_prompts"):
        load_config("cpu", ["output.sample_every=5"])


def test_preset_file_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text("[memory]\nprecission = 'fp16'\n")
    with pytest.raises(SdtuneError, match=r"memory.precission.*mine.toml.*memory.precision"):
        load_config(str(bad))
    bad.write_text("[train]\nbatch_size = 'two'\n")
    with pytest.raises(SdtuneError, match=r"train.batch_size in mine.toml must be an integer"):
        load_config(str(bad))
    bad.write_text("[train\n")
    with pytest.raises(SdtuneError, match="not valid TOML"):
        load_config(str(bad))
    with pytest.raises(SdtuneError, match="unknown preset 'rtx9999'.*rtx3050"):
        load_config("rtx9999")


def test_a_plan_reads_its_memory_keys_through_and_resolves_the_launch():
    from sdtune.plan import make_plan, plan_for_gpus, resolve_plan
    from sdtune.util.world import World

    cfg, _ = load_config("cpu", ["memory.precision=bf16", "memory.gradient_checkpointing=true"])
    plan = make_plan(cfg.memory, "cpu", "sdpa")
    assert plan.memory is cfg.memory and (plan.precision, plan.gradient_checkpointing) == ("bf16", True)
    assert (plan.optimizer, plan.param_offload, plan.distributed, plan.loss_scaling) == ("adamw", "none", "none", False)
    assert resolve_plan(cfg, world=World(size=2)).distributed == "ddp"
    assert resolve_plan(cfg, world=World()).distributed == resolve_plan(cfg.memory).distributed == "none"
    assert plan_for_gpus(cfg, "cuda", gpus=2).distributed == "ddp"
    fsdp, _ = load_config("cpu", ["memory.distributed=fsdp", "train.method=lora"])
    assert plan_for_gpus(fsdp, "cuda").distributed == "none"  # one card: a launch rule has nothing to refuse
    with pytest.raises(SdtuneError, match="memory.distributed=fsdp.*train.method=lora"):
        plan_for_gpus(fsdp, "cuda", gpus=2)
