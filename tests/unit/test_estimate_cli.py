"""`sdtune estimate-vram` and `--preset auto`: plan picking with a fake GPU and a fake estimator, and the
command's table and JSON around the fake estimator (the same command with the real estimator, which traces
each plan at full size, is tests/e2e/test_estimate_vram.py)."""

import dataclasses
import json
import types

import pytest
import torch
from typer.testing import CliRunner

import sdtune.estimate
from sdtune.cli import app
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.estimate import Estimate, auto

runner = CliRunner()
GIB = 2**30
GPU_PRESETS = ["rtx2070", "rtx3050", "rtx3080", "rtx4090"]
REMEMBERED = sdtune.estimate.remembered  # the real one: `fake_estimator` replaces it
CATEGORIES = ("weights", "frozen", "gradients", "optimizer_state", "activations", "temporaries",
              "allocator_overhead", "cuda_context")


# ---------------------------------------------------------------------------------------------------------
# Fakes: a GPU, and an estimator whose totals depend only on the plan's memory levers


# A real Estimate, its figures replaced by the fake estimator's: the command reads what the real one has
BLANK = Estimate(model="sd15", preset="", resolution=512, batch_size=1, device="cuda", categories={},
                 peak_allocated=0, peak_reserved=0, total=0, host_ram=0, disk=0, card_gib=0, seconds=0.01)


def plan_gib(mem) -> float:
    """The fake's total: everything on the GPU 22 GiB, with checkpointing 15, optimizer offloaded 6.5,
    weights streamed 2.5."""
    if mem.param_offload != "none":
        return 2.5
    if mem.optimizer_offload != "none":
        return 6.5
    return 15.0 if mem.gradient_checkpointing else 22.0


@pytest.fixture
def fake_estimator(monkeypatch):
    """Replace sdtune.estimate's `estimate` with one that records its calls."""
    calls = []

    def estimate(cfg, info, model=None, *, device="cuda", gpus=1):
        calls.append((cfg, info, model, device))
        total = int(plan_gib(cfg.memory) * GIB)
        context, overhead = int(0.4 * GIB), int(0.1 * GIB)
        allocated = total - context - overhead
        share = allocated // 6
        categories = dict.fromkeys(CATEGORIES[:6], share)
        categories["temporaries"] += allocated - 6 * share
        categories.update(allocator_overhead=overhead, cuda_context=context)
        return dataclasses.replace(
            BLANK, model=model or "sd15", preset=info.name, resolution=cfg.data.resolution,
            batch_size=cfg.train.batch_size, device=device, categories=categories, peak_allocated=allocated,
            peak_reserved=allocated + overhead, total=total, card_gib=info.vram_gib,
            host_ram={"none": GIB, "cpu": 14 * GIB, "nvme": 4 * GIB}[cfg.memory.optimizer_offload])

    # on the package itself: its callers import `estimate` when called, and its submodules stay importable
    monkeypatch.setattr(sdtune.estimate, "estimate", estimate)
    monkeypatch.setattr(sdtune.estimate, "remembered", estimate)  # every listing and estimate-vram traces
    return calls


def fake_gpu(monkeypatch, gib: float, name="Fake RTX", major=8):
    props = types.SimpleNamespace(name=name, total_memory=int(gib * GIB), major=major, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=0: props)


@pytest.fixture(autouse=True)
def plenty_of_host_ram(monkeypatch):
    monkeypatch.setattr(auto, "host_ram", lambda: 64 * GIB)


def memory_levers(cfg):
    m = cfg.memory
    return m.precision, m.gradient_checkpointing, m.optimizer_offload, m.param_offload


# ---------------------------------------------------------------------------------------------------------
# --preset auto: the plan picker


def _distinct_plans(plans) -> bool:
    """No two candidates train the same way (the same memory levers and batch size): each is estimated once."""
    ways = [(memory_levers(cfg), cfg.train.batch_size) for _, cfg, _ in plans]
    return len(set(ways)) == len(ways)


def test_candidates_are_tried_fastest_first_each_plan_once():
    """What the order promises a user, not its ranks: streaming the weights, the slowest lever, is the
    last resort, a preset without checkpointing comes before itself with it, and no plan is tried twice."""
    plans = auto.ordered(auto.Gpu("Fake", 8 * GIB, bf16=True), [])
    streamed = [cfg.memory.param_offload != "none" for _, cfg, _ in plans]
    assert any(streamed) and streamed == sorted(streamed)  # every streamed plan after every other one
    labels = [cand.label for cand, _, _ in plans]
    assert labels.index("rtx4090") < labels.index("rtx4090 + memory.gradient_checkpointing=true")
    assert _distinct_plans(plans) and len(set(labels)) == len(labels)
    same = auto.ordered(auto.Gpu("Fake", 8 * GIB, bf16=True), ["train.batch_size=2"])
    assert "rtx3080" not in [c.label for c, _, _ in same] and _distinct_plans(same)  # now rtx3050's plan


def test_without_bf16_the_plans_run_in_fp16():
    plans = auto.ordered(auto.Gpu("Turing", 8 * GIB, bf16=False), [])
    assert {cfg.memory.precision for _, cfg, _ in plans} == {"fp16"}
    labels = [c.label for c, _, _ in plans]
    assert "rtx2070" in labels and "rtx3050 + memory.precision=fp16" not in labels  # rtx3050 in fp16 is rtx2070
    assert _distinct_plans(plans)


@pytest.mark.parametrize("card_gib, preset, extra", [
    (80, "rtx4090", ()),
    (24, "rtx4090", ("memory.gradient_checkpointing=true",)),
    (8, "rtx3050", ()),
    (12, "rtx3080", ()),
    (4, "rtx3050", ("memory.param_offload=cpu",)),
])
def test_the_fastest_plan_that_fits_is_picked(monkeypatch, fake_estimator, card_gib, preset, extra):
    fake_gpu(monkeypatch, card_gib)
    pick = auto.pick_plan()
    assert (pick.preset, pick.extra) == (preset, extra)
    assert pick.estimate.total <= auto.SAFETY * card_gib * GIB
    assert all(device == "cuda" for *_, device in fake_estimator)
    assert fake_estimator[-1][1].name == preset  # the last plan estimated is the pick: slower ones are not tried
    assert pick.label in pick.reason and "Fake RTX" in pick.reason
    assert f"needs {pick.estimate.total / GIB:.2f} GiB" in pick.reason
    if card_gib == 24:
        assert "faster plans need more: rtx4090 22.00 GiB" in pick.reason


def test_the_safety_margin_is_applied(monkeypatch, fake_estimator):
    exact = 6.5 / auto.SAFETY  # the offloaded plan (6.5 GiB) uses exactly SAFETY of this card
    fake_gpu(monkeypatch, exact + 0.01)
    assert auto.pick_plan().label == "rtx3050"
    fake_gpu(monkeypatch, exact - 0.01)  # 6.5 GiB still fits in the card's memory, not in its 90%
    assert auto.pick_plan().label == "rtx3050 + memory.param_offload=cpu"


def test_nothing_fits_names_the_smallest_estimate_and_the_card(monkeypatch, fake_estimator):
    fake_gpu(monkeypatch, 2, name="Tiny GPU")
    with pytest.raises(SdtuneError) as caught:
        auto.pick_plan()
    message = str(caught.value)
    assert "\n" not in message
    assert "rtx3050 + memory.param_offload=cpu" in message and "2.50 GiB" in message
    assert "Tiny GPU" in message and "2.0 GiB" in message


def test_without_cuda_the_cpu_preset(monkeypatch, fake_estimator):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pick = auto.pick_plan(["train.max_steps=3"])
    assert (pick.preset, pick.extra, pick.estimate) == ("cpu", (), None)
    assert pick.reason == "no CUDA GPU: the cpu preset"
    assert fake_estimator == []


def test_user_overrides_apply_to_every_plan(monkeypatch, fake_estimator):
    fake_gpu(monkeypatch, 8)
    pick = auto.pick_plan(["data.resolution=768", "train.batch_size=2"])
    assert {(cfg.data.resolution, cfg.train.batch_size) for cfg, *_ in fake_estimator} == {(768, 2)}
    assert pick.label == "rtx3050"
    # weight streaming forced by the user: the plans it contradicts (no checkpointing, no offload) are skipped
    fake_estimator.clear()
    pick = auto.pick_plan(["memory.param_offload=cpu"])
    assert pick.label == "rtx3050" and len(fake_estimator) == 1
    assert fake_estimator[0][0].memory.param_offload == "cpu"


def test_host_ram_is_weighed_as_vram_is(monkeypatch, fake_estimator):
    """The offloaded plans fit the 8 GB card but need 14 GiB of host RAM: on a 12 GiB machine none is picked."""
    fake_gpu(monkeypatch, 8)
    monkeypatch.setattr(auto, "host_ram", lambda: 12 * GIB)
    with pytest.raises(SdtuneError) as caught:
        auto.pick_plan()
    message = str(caught.value)
    assert "host RAM (12.0 GiB" in message and "needs 14.0 GiB" in message
    assert "--set memory.optimizer_offload=nvme --set memory.offload_dir=DIR" in message
    monkeypatch.setattr(auto, "host_ram", lambda: 16 * GIB)  # 14 GiB is within 90% of 16
    assert auto.pick_plan().label == "rtx3050"


SDXL_PRESETS = ["sdxl-4gb", "sdxl-8gb", "sdxl-12gb", "sdxl-16gb", "sdxl-24gb"]  # by card size


def test_sdxl_presets_are_their_own_family():
    assert auto.gpu_presets() == GPU_PRESETS and auto.gpu_presets("sdxl") == SDXL_PRESETS
    gpu = auto.Gpu("Fake", 8 * GIB, bf16=True)
    labels = [cand.label for cand, _, _ in auto.ordered(gpu, [], "sdxl")]
    # sdxl-24gb is sdxl-16gb's plan on a bigger card; sdxl-16gb with checkpointing is sdxl-12gb; sdxl-8gb's nvme
    # tier needs a folder only the user can name
    assert labels == ["sdxl-16gb", "sdxl-12gb", "sdxl-12gb + memory.param_offload=cpu"]
    named = [cand.label for cand, _, _ in auto.ordered(gpu, ["memory.offload_dir=/tmp"], "sdxl")]
    # sdxl-8gb with weight streaming is sdxl-4gb's plan: tried once, under the preset's name
    assert "sdxl-8gb" in named and "sdxl-4gb" in named and "sdxl-8gb + memory.param_offload=cpu" not in named


@pytest.mark.parametrize("model", ["sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "tiny_sdxl", "xl_file"])
def test_an_sdxl_model_gets_the_sdxl_plans(monkeypatch, fake_estimator, request, tmp_path, model):
    if model == "tiny_sdxl":
        model = str(request.getfixturevalue("tiny_sdxl"))
    if model == "xl_file":  # a single file is known by its keys
        from safetensors.torch import save_file

        model = str(tmp_path / "xl.safetensors")
        save_file({key: torch.zeros(2) for key in ("model.diffusion_model.label_emb.0.0.weight",  # the base's keys
                                                   "conditioner.embedders.0.transformer.x",
                                                   "conditioner.embedders.1.model.x", "first_stage_model.x")},
                  model)
    fake_gpu(monkeypatch, 24)
    pick = auto.pick_plan([f"model.pretrained={model}"])
    assert pick.preset == "sdxl-24gb"  # sdxl-16gb's plan, named by the card nearest this one
    assert {info.name for _, info, _, _ in fake_estimator} <= set(SDXL_PRESETS)
    fake_estimator.clear()
    fake_gpu(monkeypatch, 8)
    assert auto.pick_plan([f"model.pretrained={model}"]).preset == "sdxl-16gb"  # the fake's offloaded plans: 6.5 GiB


@pytest.mark.parametrize("model", ["", "sd15", "someone/my-sdxl-finetune", "tiny_sd1"])
def test_other_models_get_the_sd_plans(monkeypatch, fake_estimator, request, model):
    """A hub id is read as SDXL only when it is the repository of the bundled sdxl configs: a name is no
    architecture, so any other hub id gets the SD plans (pass a local folder or file to be sure)."""
    if model == "tiny_sd1":
        model = str(request.getfixturevalue("tiny_sd1"))
    fake_gpu(monkeypatch, 8)
    pick = auto.pick_plan([f"model.pretrained={model}"] if model else [])
    assert pick.preset == "rtx3050"
    assert {info.name for _, info, _, _ in fake_estimator} <= set(GPU_PRESETS)


def test_sdxl_on_a_small_desktop_needs_the_nvme_folder(monkeypatch, fake_estimator):
    """The host-RAM tiers need 14 GiB (the fake's), more than 90% of 12: only the nvme plan fits, and only
    once the user names its folder."""
    fake_gpu(monkeypatch, 8)
    monkeypatch.setattr(auto, "host_ram", lambda: 12 * GIB)
    with pytest.raises(SdtuneError, match="memory.offload_dir=DIR"):
        auto.pick_plan(["model.pretrained=sdxl"])
    pick = auto.pick_plan(["model.pretrained=sdxl", "memory.offload_dir=/tmp"])
    assert pick.preset == "sdxl-8gb"
    assert load_config(pick.preset, [*pick.extra, "memory.offload_dir=/tmp"])[0].memory.offload_dir == "/tmp"


def fake_training(monkeypatch):
    """Replace the training run with one that records the config it was given."""
    seen = {}

    def attempt(cfg, info, data, out, **kwargs):
        seen.update(cfg=cfg, info=info)
        return {"pipeline_class": "StableDiffusionPipeline", "steps": 1, "final_loss": 0.1, "seconds_per_step": 0.1,
                "peak_memory_bytes": GIB,
                "peak_memory_kind": "reserved", "skipped_steps": 0,
                "disk": {"output_bytes": 0, "checkpoint_bytes": 0, "checkpoints_kept": False}}

    monkeypatch.setattr("sdtune.run.attempt", attempt)
    return seen


def test_train_with_preset_auto_trains_the_picked_plan(monkeypatch, fake_estimator, tmp_path, images):
    fake_gpu(monkeypatch, 24, name="RTX 3090")
    seen = fake_training(monkeypatch)
    result = runner.invoke(app, ["train", "--preset", "auto", "--data", str(images), "--out", str(tmp_path / "o"),
                                 "--max-steps", "300", "--set", "train.learning_rate=3e-5"])
    assert result.exit_code == 0, result.output
    assert "--preset auto: rtx4090 + memory.gradient_checkpointing=true on RTX 3090" in result.output
    cfg, info = seen["cfg"], seen["info"]
    assert info.name == "rtx4090" and cfg.memory.gradient_checkpointing
    assert (cfg.train.max_steps, cfg.train.learning_rate) == (300, 3e-5)
    assert cfg == load_config("rtx4090", ["memory.gradient_checkpointing=true", "train.learning_rate=3e-5",
                                          "train.max_steps=300"])[0]


def test_train_with_preset_auto_without_a_gpu_trains_on_the_cpu(monkeypatch, tmp_path, images, tiny_sd1):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", "--preset", "auto", "--data", str(images), "--model", str(tiny_sd1),
                                 "--out", str(out), "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    assert "no CUDA GPU: the cpu preset" in result.output
    assert 'device = "cpu"' in (out / "config.toml").read_text()


def test_train_with_preset_auto_when_nothing_fits_is_one_line(monkeypatch, fake_estimator, tmp_path, images):
    fake_gpu(monkeypatch, 2)
    result = runner.invoke(app, ["train", "--preset", "auto", "--data", str(images), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert [line for line in result.output.splitlines() if line.strip()] == [result.output.strip()]
    assert result.output.startswith("error: no memory plan fits")


# ---------------------------------------------------------------------------------------------------------
# estimate-vram with the fake estimator: what the command does around the estimate


def test_estimate_vram_table_shows_categories_and_verdict(fake_estimator, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["estimate-vram"])
    assert result.exit_code == 0, result.output
    for label in ("weights", "frozen", "gradients", "optimizer state", "activations", "temporaries",
                  "allocator overhead", "CUDA context", "peak reserved", "total", "host RAM", "disk (nvme)"):
        assert label in result.stdout
    assert "rtx3050" in result.stdout and "fits 8 GB" in result.stdout and "6.50" in result.stdout
    assert "no GPU detected" in result.stdout
    assert fake_estimator[0][2] is None  # --model not given: the estimator's default (the preset's, or sd15)


def test_estimate_vram_all_presets_fit_80_columns(fake_estimator):
    result = runner.invoke(app, ["estimate-vram", "--preset", "all"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert [info.name for _, info, _, _ in fake_estimator] == GPU_PRESETS
    assert "does not fit 24 GB" not in result.stdout and "fits 24 GB" in result.stdout
    table = [line for line in result.stdout.splitlines() if "│" in line]
    assert max(len(line) for line in table) <= 80
    verdicts = next(line for line in table if "fits 24 GB" in line)  # one line: no verdict wrapped
    assert verdicts.count("fits") == 4 and "does not" not in verdicts


def test_estimate_vram_verdict_when_too_big(fake_estimator):
    result = runner.invoke(app, ["estimate-vram", "--set", "memory.optimizer_offload=none"])
    assert result.exit_code == 0, result.output
    assert "does not fit 8 GB" in result.stdout


def test_estimate_vram_json_is_one_document(fake_estimator, monkeypatch):
    fake_gpu(monkeypatch, 12, name="RTX 3060")
    result = runner.invoke(app, ["estimate-vram", "--preset", "all", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["gpu"]["name"] == "RTX 3060" and doc["gpu"]["total_memory"] == 12 * GIB
    assert doc["gpu"]["fits"] == {"rtx2070": True, "rtx3050": True, "rtx3080": True, "rtx4090": False}
    assert [e["preset"] for e in doc["estimates"]] == GPU_PRESETS
    for entry in doc["estimates"]:
        assert list(entry["categories"]) == list(CATEGORIES)
        assert {"total", "peak_reserved", "host_ram", "disk", "card_gib", "fits"} <= set(entry)


def test_estimate_vram_reports_the_gpu(fake_estimator, monkeypatch):
    fake_gpu(monkeypatch, 12, name="RTX 3060")
    result = runner.invoke(app, ["estimate-vram", "--preset", "all"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("GPU detected"))
    assert "RTX 3060, 12.00 GiB" in line and "rtx3050 fits" in line and "rtx4090 does not fit" in line


def test_resolution_and_batch_size_win_over_set_and_preset(fake_estimator):
    args = ["estimate-vram", "--model", "sd21", "--set", "data.resolution=640", "--set", "train.batch_size=3"]
    assert runner.invoke(app, [*args, "--resolution", "768", "--batch-size", "2"]).exit_code == 0
    assert runner.invoke(app, args).exit_code == 0
    (cfg, _, model, _), (cfg_set, *_) = fake_estimator
    assert (cfg.data.resolution, cfg.train.batch_size, model) == (768, 2, "sd21")
    assert (cfg_set.data.resolution, cfg_set.train.batch_size) == (640, 3)


def test_estimate_vram_bad_input_is_one_line(fake_estimator):
    for args, word in ((["--preset", "rtx9000"], "unknown preset"), (["--set", "memory.precision=fp8"], "fp8"),
                       (["--resolution", "100"], "multiple of 8")):
        result = runner.invoke(app, ["estimate-vram", *args])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error:") and result.output.count("\n") == 1 and word in result.output


def test_estimate_vram_preset_auto_shows_the_pick_and_its_estimate(fake_estimator, monkeypatch):
    fake_gpu(monkeypatch, 8)
    result = runner.invoke(app, ["estimate-vram", "--preset", "auto"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("--preset auto: rtx3050 on Fake RTX (8.0 GiB")
    header = next(line for line in result.stdout.splitlines() if "┃ GiB" in line)
    assert header.split("┃")[2].strip() == "rtx3050"  # one column: the pick, estimated once (by the pick)
    assert [info.name for _, info, _, _ in fake_estimator].count("rtx3050") == 1
    doc = json.loads(runner.invoke(app, ["estimate-vram", "--preset", "auto", "--json"]).stdout)
    assert doc["auto"]["preset"] == "rtx3050" and [e["preset"] for e in doc["estimates"]] == ["rtx3050"]


def test_estimate_vram_preset_auto_without_a_gpu_estimates_the_cpu_plan(fake_estimator, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["estimate-vram", "--preset", "auto"])
    assert result.exit_code == 0, result.output
    assert "no CUDA GPU: the cpu preset" in result.stdout and "warning: no --model given" in result.stdout
    ((cfg, info, model, _),) = fake_estimator
    assert info.name == "cpu" and cfg.memory.device == "cpu" and model is None
    refused = runner.invoke(app, ["estimate-vram", "--preset", "auto", "--gpus", "2"])
    assert refused.exit_code == 2 and "--preset auto picks a plan for one GPU" in refused.output


def test_estimate_vram_verdict_weighs_host_ram_too(fake_estimator):
    """The fake's rtx3050 needs 6.5 GiB of VRAM and 14 GiB of host RAM: it fits its card, and a 16 GiB host
    only by the 90% rule (14.4 GiB), not a 12 GiB one."""
    small = runner.invoke(app, ["estimate-vram", "--host-ram", "12"])
    assert small.exit_code == 0, small.output
    assert "host RAM: 12 GiB (--host-ram); a plan may use 90% of it" in small.stdout
    assert "rtx3050: fits 8 GB, needs 14.0 GiB host RAM: too much for 12 GiB" in small.stdout
    assert "rtx3050: fits 8 GB, needs 14.0 GiB host RAM: fits 16 GiB" in runner.invoke(
        app, ["estimate-vram", "--host-ram", "16"]).stdout
    mine = runner.invoke(app, ["estimate-vram"])  # this machine's: 64 GiB (plenty_of_host_ram)
    assert "host RAM: 64 GiB (this machine's)" in mine.stdout and "host RAM: fits 64 GiB" in mine.stdout
    nvme = runner.invoke(app, ["estimate-vram", "--host-ram", "12", "--set", "memory.optimizer_offload=nvme",
                               "--set", "memory.offload_dir=/tmp"])
    assert "needs 4.0 GiB host RAM" in nvme.stdout and "fits 12 GiB" in nvme.stdout
    doc = json.loads(runner.invoke(app, ["estimate-vram", "--preset", "all", "--host-ram", "12", "--json"]).stdout)
    assert doc["host"]["ram"] == 12 * GIB and doc["host"]["from"] == "--host-ram"
    assert doc["host"]["fits"] == {"rtx2070": False, "rtx3050": False, "rtx3080": False, "rtx4090": True}
    assert doc["host"]["needs"]["rtx3050"] == 14 * GIB


def test_presets_lists_method_and_needs_in_80_columns(fake_estimator):
    result = runner.invoke(app, ["presets"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = {line.split()[0]: line.split() for line in lines if line.split() and load_config_or_none(line.split()[0])}
    assert set(rows) >= {"cpu", "rtx2070", "rtx3050", "rtx3080", "rtx4090", "sdxl-8gb", "sdxl-12gb", "lora-4gb"}
    assert rows["rtx3050"][1:6] == ["full", "8", "GB", "6.5", "14.0"] and rows["lora-4gb"][1] == "LoRA"
    assert rows["sdxl-8gb"][4:6] == ["6.5", "4.0"] and rows["sdxl-12gb"][4:6] == ["6.5", "14.0"]
    text = " ".join(result.stdout.split())
    assert "sdxl-12gb, sdxl-16gb and sdxl-24gb need the same VRAM (6.5 GiB) but not the same host RAM:" in text
    assert "sdxl-8gb 4.0 GiB" in text and "sdxl-12gb 14.0 GiB" in text
    last_row = max(i for i, line in enumerate(lines) if line.split() and line.split()[0] in rows)
    assert "rtx4090" not in " ".join(lines[last_row + 1:])  # 22 GiB like lora-6gb, and the same host RAM: no line
    assert len(fake_estimator) == len(rows)  # each preset estimated once, at its own model and size


def load_config_or_none(name):
    try:
        return load_config(name)
    except SdtuneError:
        return None


def test_estimate_vram_help_says_what_the_numbers_are():
    result = runner.invoke(app, ["estimate-vram", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for words in ("meta device", "max_memory_reserved", "CUDA context", "--resolution", "--batch-size", "--json"):
        assert words in text


def test_an_unknown_hub_id_is_estimated_as_sd15_and_the_reason_says_so(monkeypatch, fake_estimator):
    fake_gpu(monkeypatch, 80)
    pick = auto.pick_plan(["model.pretrained=someone/my-sdxl-finetune"])
    assert pick.preset == "rtx4090"  # an SD plan: the name of a repository is no architecture
    assert ("estimated as sd15 (SD 1.x) because someone/my-sdxl-finetune is a hub id of no bundled "
            "architecture") in pick.reason and "\n" not in pick.reason
    assert "estimated as" not in auto.pick_plan().reason  # a preset's own model: a bundled architecture's hub id


def test_one_detector_reads_every_kind_of_source(tiny_sd1):
    from sdtune.family import Detected, assumed_architecture, detect

    assert detect("stabilityai/stable-diffusion-xl-base-1.0") == Detected("sdxl", "sdxl")
    assert detect("sd21") == Detected("sd21", "sd")
    assert detect("someone/my-sdxl-finetune") == Detected("sd15", "sd", assumed=True)
    assert detect("") == Detected("sd15", "sd", assumed=True)
    assert detect(str(tiny_sd1)) == Detected(None, "sd")  # a folder of other sizes: its family only
    assert assumed_architecture("someone/x") == ("sd15", True)
    assert assumed_architecture("stable-diffusion-v1-5/stable-diffusion-v1-5") == ("sd15", False)
    assert assumed_architecture(str(tiny_sd1)) == (str(tiny_sd1), False)
    with pytest.raises(SdtuneError, match="unknown model nonsense"):
        detect("nonsense")


# ---------------------------------------------------------------------------------------------------------
# estimate-vram remembers what it traced: a bundled architecture's plan, read back in a fresh process


@pytest.fixture
def traced_once(monkeypatch, tmp_path, fake_estimator):
    """The fake estimator behind the real `remembered`, its cache in `tmp_path`."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(sdtune.estimate, "remembered", REMEMBERED)
    return fake_estimator


def _figures(output: str) -> list[dict]:
    return [{k: v for k, v in est.items() if k != "seconds"} for est in json.loads(output)["estimates"]]


def test_estimate_vram_reads_back_a_plan_it_traced_but_traces_a_local_model_each_time(traced_once, tiny_sd1):
    asked = ["estimate-vram", "--model", "sdxl", "--preset", "sdxl-8gb", "--json"]
    first, second = (runner.invoke(app, asked) for _ in range(2))
    assert first.exit_code == second.exit_code == 0, first.output
    assert _figures(first.stdout) == _figures(second.stdout) and len(traced_once) == 1  # the second read back
    assert runner.invoke(app, [*asked, "--resolution", "768"]).exit_code == 0 and len(traced_once) == 2  # another plan
    local = ["estimate-vram", "--model", str(tiny_sd1), "--preset", "rtx3050", "--json"]
    codes = [runner.invoke(app, local).exit_code for _ in range(2)]
    assert codes == [0, 0] and len(traced_once) == 4  # a folder's configs may change under its path: traced each time


def test_a_remembered_plan_cut_short_is_traced_again(traced_once, tmp_path):
    """A cache file cut short (a full disk, a half-copied cache folder) is no answer: the plan is traced again
    and remembered whole, and the command does not fail."""
    asked = ["estimate-vram", "--model", "sd15", "--preset", "rtx3050", "--json"]
    first = runner.invoke(app, asked)
    (saved,) = (tmp_path / "sdtune" / "estimates").iterdir()
    saved.write_text(saved.read_text()[:100])
    second, third = runner.invoke(app, asked), runner.invoke(app, asked)
    assert first.exit_code == second.exit_code == third.exit_code == 0, second.output
    assert _figures(first.stdout) == _figures(second.stdout) == _figures(third.stdout)
    assert len(traced_once) == 2  # traced again once, then read back


def test_a_remembered_plan_is_answered_without_importing_torch(traced_once, tmp_path):
    """A fresh process reading a remembered plan imports neither torch nor diffusers (on a machine without
    a GPU driver: with one, torch asks the GPU), and prints the figures that were traced."""
    import os
    import subprocess
    import sys

    asked = ["estimate-vram", "--model", "sd15", "--preset", "rtx3050", "--json"]
    traced = runner.invoke(app, asked)
    script = ("import atexit, sys; atexit.register(lambda: print(sorted(m for m in ('torch', 'diffusers', "
              "'transformers') if m in sys.modules), file=sys.stderr)); from sdtune.cli import app; "
              f"sys.argv = ['sdtune', *{asked!r}]; app()")
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert fresh.returncode == 0, fresh.stderr
    assert _figures(fresh.stdout) == _figures(traced.stdout) and len(traced_once) == 1
    if auto._no_gpu_driver():
        assert fresh.stderr.strip().splitlines()[-1] == "[]"


def test_no_gpu_driver_is_read_from_the_machine_not_from_torch(monkeypatch):
    import shutil
    import sys

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(auto.os.path, "exists", lambda path: False)
    assert auto._no_gpu_driver()
    monkeypatch.setattr(auto.os.path, "exists", lambda path: path == "/dev/nvidiactl")
    assert not auto._no_gpu_driver()
    monkeypatch.setattr(auto.os.path, "exists", lambda path: False)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert not auto._no_gpu_driver()  # a driver whose module is not loaded yet: torch loads it
    monkeypatch.setattr(sys, "platform", "win32")
    assert not auto._no_gpu_driver()
