"""Sample prompts with their own settings, in kohya's sd-scripts format, parsed once into `PromptSpec`s.

    a girl in a red coat --n blurry, lowres --w 512 --h 768 --d 3 --s 28 --l 6.5 --ss euler_a

One prompt a line (`output.sample_prompts_file`, or an entry of `output.sample_prompts`): `--n` negative
prompt, `--w`/`--h` size (rounded down to a multiple of 8, at least 64, as kohya's sample_image_inference
does), `--d` seed, `--s` steps (kept within 1..1000), `--l` CFG scale, `--ss` sampler (kohya's names, the
diffusers scheduler classes its get_my_scheduler picks). Blank lines and `#` comments are skipped. kohya's
options for other model families (`--g`, `--cn`, `--ctr`, `--rcfg`, `--fs`) and unknown ones are warned
about and ignored; a bad value or an unknown sampler is one error line naming the file and line. kohya's
.toml (`[prompt]` defaults, `[[prompt.subset]]` prompts) and .json (a list of lines or of dicts) prompt files
read the same way. An option left out takes the run's default (`defaults_of`): data.resolution,
output.sample_steps, GUIDANCE, output.sample_negative_prompt, train.seed, the model's own
scheduler. Nothing heavy is imported here: the config checks the inline prompts when it is built.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import tomllib

from sdtune.errors import SdtuneError

GUIDANCE = 7.5  # classifier-free guidance scale of the training samples and `sdtune sample`'s default


@dataclass(frozen=True, kw_only=True)
class PromptSpec:
    """One sample image's prompt and settings, every default filled in."""

    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int = 0
    steps: int = 20
    guidance: float = GUIDANCE
    sampler: str = ""  # kohya's sampler name (a key of SAMPLERS); empty: the model's own scheduler


# kohya's --ss names (train_util.get_my_scheduler): the diffusers class, its extra arguments, and the name
# AUTOMATIC1111 gives the sampler in its `parameters` (kohya's own where A1111 has none)
SAMPLERS: dict[str, tuple[str, dict, str]] = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "lms": ("LMSDiscreteScheduler", {}, "LMS"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "dpm_2": ("KDPM2DiscreteScheduler", {}, "DPM2"),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}, "DPM2 a"),
    # (diffusers refuses its default final_sigmas_type="zero" with the first-order dpmsolver)
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
                  "dpmsolver"),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}, "dpmsingle"),
}
SAMPLERS |= {f"k_{name}": SAMPLERS[name] for name in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a")}

# kohya's option letters (line_to_prompt_dict) and the keys of its prompt dicts (also its .toml/.json keys)
OPTIONS = {"w": "width", "h": "height", "d": "seed", "s": "sample_steps", "l": "scale", "n": "negative_prompt",
           "ss": "sample_sampler", "g": "guidance_scale", "cn": "controlnet_image", "ctr": "cfg_trunc_ratio",
           "rcfg": "renorm_cfg", "fs": "flow_shift"}
INTEGERS, NUMBERS = ("width", "height", "seed", "sample_steps"), ("scale", "guidance_scale", "cfg_trunc_ratio",
                                                                   "renorm_cfg")
# kohya parses these for FLUX, Lumina and ControlNet sampling; an SD model has no use for them
OTHER_FAMILIES = {"guidance_scale": "FLUX's distilled guidance", "controlnet_image": "a ControlNet image",
                  "cfg_trunc_ratio": "Lumina's CFG truncation", "renorm_cfg": "Lumina's CFG renormalisation",
                  "flow_shift": "a flow-matching shift"}

Warn = Callable[[str], None]


def parse_line(line: str) -> dict:
    """kohya's prompt dict of one line (its keys and value types, as line_to_prompt_dict makes it); a bad
    value raises ValueError, an unknown option is kept as "--KEY" for the caller to warn about."""
    prompt, *options = line.split(" --")
    found: dict = {"prompt": prompt.strip()}
    for option in options:
        letter, _, value = option.strip().partition(" ")
        key, value = OPTIONS.get(letter.lower(), f"--{letter}"), value.strip()
        if key in OPTIONS.values() and not value:
            raise ValueError(f"--{letter} needs a value")
        if key in INTEGERS and not re.fullmatch(r"\d+", value, re.ASCII):
            raise ValueError(f"--{letter} needs a whole number, got {value!r}")
        if key in NUMBERS and not re.fullmatch(r"\d+(\.\d*)?|\.\d+", value, re.ASCII):
            raise ValueError(f"--{letter} needs a number, got {value!r}")
        found[key] = int(value) if key in INTEGERS else float(value) if key in NUMBERS else value
        if key == "sample_steps":
            found[key] = max(1, min(1000, found[key]))  # as kohya clamps --s
    return found


def spec_of(found: dict, defaults: PromptSpec, warn: Warn) -> PromptSpec:
    """The `PromptSpec` of kohya's prompt dict `found`, the rest from `defaults`; ValueError on a bad value."""
    values = {}
    for key, value in found.items():
        if key in OTHER_FAMILIES:
            warn(f"{key} ({OTHER_FAMILIES[key]}) is for other model families: ignored")
            continue
        if key not in FIELDS:
            warn(f"unknown option {key}: ignored")
            continue
        if key in INTEGERS and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{key} must be a whole number >= 0, got {value!r}")
        if key == "scale" and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            raise ValueError(f"scale must be a number >= 0, got {value!r}")
        if key in ("prompt", "negative_prompt", "sample_sampler") and not isinstance(value, str):
            raise ValueError(f"{key} must be text, got {value!r}")
        values[FIELDS[key]] = value
    if "sampler" in values:
        values["sampler"] = values["sampler"].lower()
        if values["sampler"] not in SAMPLERS:
            raise ValueError(f"unknown sampler {values['sampler']!r} (--ss); use one of {', '.join(SAMPLERS)}")
        if "lms" in values["sampler"] and importlib.util.find_spec("scipy") is None:  # diffusers' LMS needs it
            raise ValueError(f"sampler {values['sampler']} needs scipy: pip install scipy, or choose another one")
    for side in ("width", "height"):
        if side in values:  # kohya's sample_image_inference: max(64, size - size % 8)
            values[side] = max(64, values[side] - values[side] % 8)
    if "steps" in values:
        values["steps"] = max(1, min(1000, values["steps"]))
    if "guidance" in values:
        values["guidance"] = float(values["guidance"])
    return replace(defaults, **values)


FIELDS = {"prompt": "prompt", "negative_prompt": "negative", "width": "width", "height": "height", "seed": "seed",
          "sample_steps": "steps", "scale": "guidance", "sample_sampler": "sampler"}


def parse_prompt(text: str, defaults: PromptSpec, warn: Warn, where: str) -> PromptSpec:
    """One prompt line's `PromptSpec`; a bad value is one SdtuneError line starting with `where`."""
    try:
        return spec_of(parse_line(text), defaults, lambda line: warn(f"{where}: {line}"))
    except ValueError as exc:
        raise SdtuneError(f"{where}: {exc}") from None


def load_prompt_file(path: str | Path, defaults: PromptSpec, warn: Warn) -> list[PromptSpec]:
    """The prompts of kohya's prompt file at `path` (.txt or any other name: lines; .toml; .json)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SdtuneError(f"output.sample_prompts_file {path} cannot be read: {exc.strerror or exc}") from None
    if path.suffix.lower() not in (".toml", ".json"):
        return [parse_prompt(line.strip(), defaults, warn, f"{path}:{number}")
                for number, line in enumerate(text.splitlines(), 1)
                if line.strip() and not line.strip().startswith("#")]
    entries = _structured(path, text)
    specs = []
    for number, entry in enumerate(entries, 1):
        where = f"{path}: prompt {number}"
        if isinstance(entry, str):
            specs.append(parse_prompt(entry, defaults, warn, where))
            continue
        if not isinstance(entry, dict):
            raise SdtuneError(f"{where}: a prompt is a line of text or a table of kohya's keys, got {entry!r}")
        try:
            specs.append(spec_of({k: v for k, v in entry.items() if k not in ("subset", "enum")}, defaults,
                                 lambda line, where=where: warn(f"{where}: {line}")))
        except ValueError as exc:
            raise SdtuneError(f"{where}: {exc}") from None
    return specs


def _structured(path: Path, text: str) -> list:
    """kohya's load_prompts of a .toml (each [[prompt.subset]] over the [prompt] table) or a .json (a list)."""
    try:
        if path.suffix.lower() == ".json":
            entries = json.loads(text)
            if not isinstance(entries, list):
                raise ValueError("a .json prompt file is a list of prompts")
            return entries
        table = tomllib.loads(text).get("prompt")
        if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
            raise ValueError("a .toml prompt file has a [prompt] table with [[prompt.subset]] entries")
        shared = {k: v for k, v in table.items() if k != "subset"}
        return [{**shared, **subset} for subset in table["subset"]]
    except ValueError as exc:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise SdtuneError(f"output.sample_prompts_file {path}: {exc}") from None


def defaults_of(cfg) -> PromptSpec:
    """What a prompt without options is drawn with in a run of `cfg` (a `sdtune.config.Config`, not imported:
    the config imports this module): its sample settings, as before prompt options."""
    size = cfg.data.resolution
    return PromptSpec(prompt="", negative=cfg.output.sample_negative_prompt, width=size, height=size,
                      seed=cfg.train.seed, steps=cfg.output.sample_steps, guidance=GUIDANCE)


def prompt_specs(cfg, warn: Warn) -> tuple[PromptSpec, ...]:
    """Every sample prompt of the run: output.sample_prompts, then output.sample_prompts_file's."""
    defaults = defaults_of(cfg)
    specs = [parse_prompt(text, defaults, warn, f"output.sample_prompts[{i}]")
             for i, text in enumerate(cfg.output.sample_prompts)]
    if cfg.output.sample_prompts_file:
        specs += load_prompt_file(cfg.output.sample_prompts_file, defaults, warn)
        if not specs:
            raise SdtuneError(f"output.sample_prompts_file {cfg.output.sample_prompts_file} holds no prompt (only "
                              "blank lines and # comments): add prompts or clear output.sample_prompts_file")
    return tuple(specs)


def check_inline(prompts: tuple[str, ...]) -> None:
    """A bad option in output.sample_prompts, said when the config is built (warnings come at the run's start)."""
    for i, text in enumerate(prompts):
        parse_prompt(text, PromptSpec(prompt=""), lambda line: None, f"output.sample_prompts[{i}]")


def make_scheduler(name: str, config):
    """Sampler `name` (kohya's) as a diffusers scheduler built from the model's scheduler `config`, so it
    keeps the model's betas and prediction type (kohya builds SD 1.x's fixed betas instead)."""
    import diffusers

    cls, extra, _ = SAMPLERS[name]
    return getattr(diffusers, cls).from_config(config, **extra)


def sampler_label(name: str, scheduler) -> str:
    """The sampler's name in a PNG's `parameters`: A1111's for kohya's `name`, else the scheduler's class."""
    return SAMPLERS[name][2] if name else type(scheduler).__name__
