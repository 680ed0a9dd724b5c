"""Sample prompts in kohya's format: each line parsed as sd-scripts' own parser parses it, kohya's sampler names,
its .toml and .json prompt files, and one error line (with the file and line) for what cannot be drawn."""

import importlib.util
import json
import logging
import re
from pathlib import Path

import pytest
from support.helpers import said

import sdtune
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.sample_prompts import (
    SAMPLERS,
    PromptSpec,
    load_prompt_file,
    make_scheduler,
    parse_line,
    parse_prompt,
    prompt_specs,
    spec_of,
)


def kohya_line_to_prompt_dict(line: str) -> dict:
    """sd-scripts library/train_util.py `line_to_prompt_dict`, transcribed (its logging of a ValueError aside)."""
    prompt_args = line.split(" --")
    prompt_dict = {}
    prompt_dict["prompt"] = prompt_args[0]
    for parg in prompt_args:
        try:
            m = re.match(r"w (\d+)", parg, re.IGNORECASE)
            if m:
                prompt_dict["width"] = int(m.group(1))
                continue
            m = re.match(r"h (\d+)", parg, re.IGNORECASE)
            if m:
                prompt_dict["height"] = int(m.group(1))
                continue
            m = re.match(r"d (\d+)", parg, re.IGNORECASE)
            if m:
                prompt_dict["seed"] = int(m.group(1))
                continue
            m = re.match(r"s (\d+)", parg, re.IGNORECASE)
            if m:  # steps
                prompt_dict["sample_steps"] = max(1, min(1000, int(m.group(1))))
                continue
            m = re.match(r"l ([\d\.]+)", parg, re.IGNORECASE)
            if m:  # scale
                prompt_dict["scale"] = float(m.group(1))
                continue
            m = re.match(r"g ([\d\.]+)", parg, re.IGNORECASE)
            if m:  # guidance scale
                prompt_dict["guidance_scale"] = float(m.group(1))
                continue
            m = re.match(r"n (.+)", parg, re.IGNORECASE)
            if m:  # negative prompt
                prompt_dict["negative_prompt"] = m.group(1)
                continue
            m = re.match(r"ss (.+)", parg, re.IGNORECASE)
            if m:
                prompt_dict["sample_sampler"] = m.group(1)
                continue
            m = re.match(r"cn (.+)", parg, re.IGNORECASE)
            if m:
                prompt_dict["controlnet_image"] = m.group(1)
                continue
            m = re.match(r"ctr (.+)", parg, re.IGNORECASE)
            if m:
                prompt_dict["cfg_trunc_ratio"] = float(m.group(1))
                continue
            m = re.match(r"rcfg (.+)", parg, re.IGNORECASE)
            if m:
                prompt_dict["renorm_cfg"] = float(m.group(1))
                continue
            m = re.match(r"fs (.+)", parg, re.IGNORECASE)
            if m:
                prompt_dict["flow_shift"] = m.group(1)
                continue
        except ValueError:
            pass
    return prompt_dict


LINES = [
    "a cat",
    "masterpiece, best quality, 1girl, in white shirts, upper body, looking at viewer, simple background "
    "--n low quality, worst quality, bad anatomy,bad composition, poor, low effort --w 768 --h 768 --d 1 --l 7.5 "
    "--s 28",
    "1boy, in business suit --n low quality --w 576 --h 832 --d 2 --l 5.5 --s 40",  # kohya's README examples
    "a dog --ss euler_a --W 640 --H 512 --D 7",  # option letters in either case
    "a dog --s 5000",  # steps kept within 1..1000
    "a dog --s 0",
    "a dog --w 512 --w 640",  # the last one wins
    "a red--w 512 circle --l .5",  # "--" inside a word is the prompt's
    "a fox --ss dpmsolver++ --l 12 --n ugly, --blurry",  # a negative prompt stops at the next option
    "a fox --g 3.5 --fs 3 --ctr 0.25 --rcfg 1.0 --cn hint.png",  # other families' options
    "a fox --ss k_dpm_2_a --d 0",
]


@pytest.mark.parametrize("line", LINES)
def test_each_line_parses_as_kohyas_line_to_prompt_dict(line):
    ours = {key: value for key, value in parse_line(line).items() if not key.startswith("--")}  # unknown: warned
    assert ours == kohya_line_to_prompt_dict(line)


def test_where_sdtune_parts_from_kohya_it_says_so_instead_of_dropping_the_option():
    # kohya's regexes also try the prompt itself ("n ..." would become the negative prompt) and drop an
    # option whose value does not match; sdtune keeps the prompt and refuses the bad value
    assert kohya_line_to_prompt_dict("n cats --w 512")["negative_prompt"] == "cats"
    assert parse_line("n cats --w 512") == {"prompt": "n cats", "width": 512}
    assert "width" not in kohya_line_to_prompt_dict("a dog --w big")
    with pytest.raises(ValueError, match="--w needs a whole number, got 'big'"):
        parse_line("a dog --w big")
    with pytest.raises(ValueError, match="--n needs a value"):
        parse_line("a dog --n")


DEFAULTS = PromptSpec(prompt="", negative="lowres", width=64, height=64, seed=5, steps=3, guidance=7.5)


def test_a_spec_takes_every_option_and_the_defaults_for_the_rest():
    spec = parse_prompt("a dog --w 100 --h 63 --d 9 --s 4 --l 5 --n blurry --ss Euler_A", DEFAULTS, print, "x")
    # sizes as kohya's sample_image_inference rounds them: max(64, size - size % 8)
    assert spec == PromptSpec(prompt="a dog", negative="blurry", width=96, height=64, seed=9, steps=4, guidance=5.0,
                              sampler="euler_a")
    assert parse_prompt("a cat", DEFAULTS, print, "x") == PromptSpec(**{**vars(DEFAULTS), "prompt": "a cat"})


def test_other_families_options_and_unknown_ones_are_warned_about():
    warned = []
    spec = parse_prompt("a cat --g 3.5 --cn hint.png --q 2 --d 4", DEFAULTS, warned.append, "p.txt:3")
    assert spec.seed == 4 and spec.prompt == "a cat"
    assert warned == ["p.txt:3: guidance_scale (FLUX's distilled guidance) is for other model families: ignored",
                      "p.txt:3: controlnet_image (a ControlNet image) is for other model families: ignored",
                      "p.txt:3: unknown option --q: ignored"]


def test_every_kohya_sampler_name_builds_its_diffusers_scheduler():
    """sd-scripts library/train_util.py `get_my_scheduler`: the class (and algorithm_type) per --ss name."""
    from diffusers import SchedulerMixin

    kohya = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
             "k_lms": "LMSDiscreteScheduler", "euler": "EulerDiscreteScheduler", "k_euler": "EulerDiscreteScheduler",
             "euler_a": "EulerAncestralDiscreteScheduler", "k_euler_a": "EulerAncestralDiscreteScheduler",
             "dpmsolver": "DPMSolverMultistepScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
             "dpmsingle": "DPMSolverSinglestepScheduler", "heun": "HeunDiscreteScheduler",
             "dpm_2": "KDPM2DiscreteScheduler", "k_dpm_2": "KDPM2DiscreteScheduler",
             "dpm_2_a": "KDPM2AncestralDiscreteScheduler", "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
             "ddpm": "DDPMScheduler"}
    assert set(SAMPLERS) == set(kohya)
    config = json.loads((Path(sdtune.__file__).parent / "assets/sdtune-tiny/scheduler/scheduler_config.json")
                        .read_text())
    for name, cls in kohya.items():
        if "lms" in name and importlib.util.find_spec("scipy") is None:
            with pytest.raises(ValueError, match=f"sampler {name} needs scipy"):
                spec_of({"sample_sampler": name}, DEFAULTS, print)
            continue
        scheduler = make_scheduler(name, config)
        assert isinstance(scheduler, SchedulerMixin) and type(scheduler).__name__ == cls, name
        assert scheduler.config.beta_end == config["beta_end"]  # the model's own betas
    assert make_scheduler("dpmsolver", config).config.algorithm_type == "dpmsolver"
    assert make_scheduler("dpmsolver++", config).config.algorithm_type == "dpmsolver++"


def test_a_bad_line_is_one_error_with_its_file_and_line_before_anything_loads(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# portraits\n\na girl --w 512\n  # indented comment\na boy --ss euler_x\n", encoding="utf-8")
    with pytest.raises(SdtuneError, match=rf"^{re.escape(str(prompts))}:5: unknown sampler 'euler_x' \(--ss\); "
                                          "use one of ddim, ddpm"):
        load_prompt_file(prompts, DEFAULTS, print)
    prompts.write_text("a girl --l 7.5.5\n", encoding="utf-8")
    with pytest.raises(SdtuneError, match=r"prompts.txt:1: --l needs a number, got '7.5.5'"):
        load_prompt_file(prompts, DEFAULTS, print)
    with pytest.raises(SdtuneError, match=r"output.sample_prompts\[1\]: unknown sampler 'fast'"):
        load_config("cpu", ["output.sample_prompts=['a', 'b --ss fast']"])


def test_toml_and_json_prompt_files_read_as_kohyas_load_prompts(tmp_path):
    toml = tmp_path / "prompts.toml"  # kohya: each [[prompt.subset]] is dict(**data["prompt"], **subset)
    toml.write_text('[prompt]\nnegative_prompt = "ugly"\nsample_steps = 4\nwidth = 72\n'
                    '[[prompt.subset]]\nprompt = "a cat"\nseed = 3\n'
                    '[[prompt.subset]]\nprompt = "a dog"\nscale = 4.0\nsample_sampler = "heun"\n', encoding="utf-8")
    cat, dog = load_prompt_file(toml, DEFAULTS, print)
    assert cat == PromptSpec(prompt="a cat", negative="ugly", width=72, height=64, seed=3, steps=4)
    assert (dog.prompt, dog.guidance, dog.sampler, dog.seed) == ("a dog", 4.0, "heun", 5)
    js = tmp_path / "prompts.json"  # a list of lines or of kohya's dicts
    js.write_text(json.dumps(["a cat --d 2", {"prompt": "a dog", "height": 80}]), encoding="utf-8")
    assert [(s.prompt, s.seed, s.height) for s in load_prompt_file(js, DEFAULTS, print)] == [
        ("a cat", 2, 64), ("a dog", 5, 80)]
    js.write_text(json.dumps([{"prompt": "a dog", "width": "wide"}]), encoding="utf-8")
    with pytest.raises(SdtuneError, match=r"prompts.json: prompt 1: width must be a whole number >= 0, got 'wide'"):
        load_prompt_file(js, DEFAULTS, print)


def test_the_run_reads_inline_prompts_then_the_file_with_its_defaults(tmp_path, caplog):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a boy --s 9 --zz 1\n", encoding="utf-8")
    cfg, _ = load_config("cpu", ["output.sample_prompts=a girl --w 128", f"output.sample_prompts_file={prompts}",
                                 "output.sample_every=2", "data.resolution=96", "train.seed=4",
                                 "output.sample_steps=6", "output.sample_negative_prompt=lowres"])
    with caplog.at_level(logging.WARNING):
        girl, boy = prompt_specs(cfg, logging.getLogger("sdtune.test").warning)
    assert girl == PromptSpec(prompt="a girl", negative="lowres", width=128, height=96, seed=4, steps=6)
    assert (boy.width, boy.steps) == (96, 9)
    assert said(caplog) == [f"warning: {prompts}:1: unknown option --zz: ignored"]
    prompts.write_text("# nothing yet\n", encoding="utf-8")
    cfg, _ = load_config("cpu", [f"output.sample_prompts_file={prompts}", "output.sample_every=2"])
    with pytest.raises(SdtuneError, match="holds no prompt"):
        prompt_specs(cfg, print)
