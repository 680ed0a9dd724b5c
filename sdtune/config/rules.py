"""The cross-key rules of a run's configuration, as one table of data: which keys each rule ties, when a
config breaks it, and the fix. A config that breaks one is refused with one line that names its keys.

    check(config)                          # Config.__post_init__: the rules that span sections
    check_section("memory", memory)        # a section's __post_init__: the rules inside it
    distributed_refusals(cfg, "ddp", key)  # plan.resolve_mode: the rules of several processes

A rule's keys decide where it is checked: all in one section, when that section is built (so a bad
`--set` is named before anything else is read); across sections, when the `Config` is; a rule `of_launch`
needs the `memory.distributed` mode a launch resolves to and is checked by `sdtune.plan.resolve_mode`.
Checks that depend on the machine (CUDA, bf16, xformers, the nvme folder) or on the world (how many
processes) stay in `sdtune.plan`. Single-key ranges (`train.max_steps >= 1`) stay on their section.

A rule's message is generated from its keys, their values and the fix; most rules keep the wording users
have met (scripts and docs match it) in `text`, a format string over the sections (`{memory.optimizer}`),
`{fix}`, and for launch rules `{why}` (`memory.distributed=ddp`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

from sdtune.errors import SdtuneError


@dataclass(frozen=True)
class Rule:
    keys: tuple[str, ...]          # "section.key" of every key the rule ties, the one to change last
    broken: Callable[..., bool]    # of a view with the sections (and `mode`): True when the rule is broken
    fix: str                       # what to set
    text: str = ""                 # today's wording, a format string; empty: generated
    of_launch: bool = False        # needs the launch's distributed mode (`mode`, `why`)

    @property
    def sections(self) -> set[str]:
        return {key.partition(".")[0] for key in self.keys}

    def message(self, view) -> str:
        """The one line a config that breaks the rule gets: it names every key of the rule."""
        if self.text:
            return self.text.format(fix=self.fix, **vars(view))
        values = " and ".join(f"{key}={_value(view, key)}" for key in self.keys)
        return f"{values} cannot be used together: {self.fix}"


def _value(view, key: str) -> str:
    section, _, name = key.partition(".")
    value = getattr(getattr(view, section), name)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _fused_needs_whole_gradient(key: str) -> str:
    return ("memory.fused_backward=true steps each weight during backward, before the whole gradient exists; "
            f"{key}={{{key}}} needs it all: {{fix}}")


# The order is the order of the checks: the first broken rule is the one reported.
RULES: tuple[Rule, ...] = (
    # [model]
    Rule(("model.init", "model.architecture"),
         lambda c: bool(c.model.architecture) and c.model.init != "random",
         "set model.init=random to train it from scratch, or clear model.architecture",
         "model.architecture is set but model.init is pretrained: {fix}"),
    # [data]
    Rule(("data.validation_dir", "data.validation_split"),
         lambda c: bool(c.data.validation_split and c.data.validation_dir),
         "hold out a share or name a folder",
         "data.validation_dir and data.validation_split are both set: {fix}"),
    Rule(("data.cache_latents", "data.center_crop"),
         lambda c: c.data.cache_latents and not c.data.center_crop,
         "set one of them the other way",
         "data.cache_latents stores one crop per image; it cannot serve data.center_crop=false "
         "(a random crop each time): {fix}"),
    Rule(("data.class_prompt", "data.class_dir"),
         lambda c: bool(c.data.class_prompt and not c.data.class_dir),
         "name the folder of the class images",
         "data.class_prompt is set but data.class_dir is empty: {fix}"),
    Rule(("data.cache_text", "data.shuffle_tags"),
         lambda c: c.data.cache_text and c.data.shuffle_tags,
         "set one of them the other way",
         "data.cache_text stores one embedding per caption; data.shuffle_tags makes a new caption each "
         "time: {fix}"),
    # [memory]
    Rule(("memory.optimizer", "memory.optimizer_offload"),
         lambda c: c.memory.optimizer_offload != "none" and c.memory.optimizer != "adamw",
         "set memory.optimizer=adamw",
         "memory.optimizer_offload={memory.optimizer_offload} steps AdamW on the host; "
         "memory.optimizer={memory.optimizer} cannot be offloaded ({fix})"),
    Rule(("memory.fused_backward", "memory.optimizer"),
         lambda c: c.memory.fused_backward and c.memory.optimizer == "prodigy",
         "set one of them the other way",
         "memory.fused_backward=true steps each weight alone; memory.optimizer=prodigy estimates its step "
         "size from every weight at once: {fix}"),
    Rule(("memory.fused_backward", "memory.precision"),
         lambda c: c.memory.fused_backward and c.memory.precision == "fp16",
         "use memory.precision=bf16 (or fp32) with it",
         "memory.fused_backward=true steps weights before fp16 overflow could be checked; {fix}"),
    Rule(("memory.optimizer_offload", "memory.offload_dir"),
         lambda c: c.memory.optimizer_offload == "nvme" and not c.memory.offload_dir,
         "memory.offload_dir (a folder on a fast local disk)",
         "memory.optimizer_offload=nvme needs {fix}"),
    Rule(("memory.param_offload", "memory.gradient_checkpointing"),
         lambda c: c.memory.param_offload != "none" and not c.memory.gradient_checkpointing,
         "memory.gradient_checkpointing=true",
         "memory.param_offload={memory.param_offload} streams weights into the recomputation of backward; "
         "it needs {fix}"),
    # [lora]
    Rule(("lora.dora", "lora.algo"),
         lambda c: c.lora.dora and c.lora.algo != "lora",
         "set lora.dora=false, or lora.algo=lora (peft has DoRA for LoRA only; lycoris-lora has it for "
         "LoHa/LoKr too)"),
    Rule(("lora.factor", "lora.algo"),
         lambda c: c.lora.factor != -1 and c.lora.algo != "lokr",
         "lora.factor splits LoKr's weights; set lora.algo=lokr or leave lora.factor at -1"),
    Rule(("lora.conv_rank", "lora.target"),
         lambda c: bool(c.lora.conv_rank) and c.lora.target != "attention+conv",
         "set lora.target=attention+conv (the convolutions get adapters only then), or lora.conv_rank=0"),
    Rule(("lora.conv_alpha", "lora.target"),
         lambda c: bool(c.lora.conv_alpha) and c.lora.target != "attention+conv",
         "set lora.target=attention+conv (the convolutions get adapters only then), or lora.conv_alpha=0"),
    Rule(("lora.dropout", "lora.algo"),
         lambda c: bool(c.lora.dropout) and c.lora.algo != "lora",
         "lora.dropout is LoRA's input dropout, which peft's LoHa and LoKr lack: set it to 0"),
    # [output]
    Rule(("output.sample_every", "output.sample_prompts"),
         lambda c: bool(c.output.sample_every and not (c.output.sample_prompts or c.output.sample_prompts_file)),
         "add prompts (or an output.sample_prompts_file) or set sample_every=0",
         "output.sample_every is set but output.sample_prompts is empty: {fix}"),
    Rule(("output.sample_at_start", "output.sample_prompts"),
         lambda c: c.output.sample_at_start and not (c.output.sample_prompts or c.output.sample_prompts_file),
         "add prompts (or an output.sample_prompts_file) or set sample_at_start=false",
         "output.sample_at_start is set but output.sample_prompts is empty: {fix}"),
    # across sections
    Rule(("train.method", "memory.optimizer_offload"),
         lambda c: c.train.method == "lora" and c.memory.optimizer_offload != "none",
         "set memory.optimizer_offload=none",
         "train.method=lora trains a few MB of weights: memory.optimizer_offload={memory.optimizer_offload} "
         "would move their AdamW state off the GPU to save nothing; {fix}"),
    Rule(("memory.param_offload", "memory.optimizer_offload", "train.method"),  # full: masters stream from a tier
         lambda c: c.train.method == "full" and c.memory.param_offload != "none"
         and c.memory.optimizer_offload == "none",
         "memory.optimizer_offload=cpu or nvme",
         "memory.param_offload={memory.param_offload} keeps weights off the GPU; it needs {fix} (else the fp32 "
         "weights and AdamW state stay on the GPU), or train.method=lora"),
    Rule(("lora.text_encoder", "train.method"),
         lambda c: c.lora.text_encoder and c.train.method != "lora",
         "train.method=lora",
         "lora.text_encoder=true needs {fix}"),
    Rule(("lora.init_from", "train.method"),
         lambda c: bool(c.lora.init_from) and c.train.method != "lora",
         "train.method=lora",
         "lora.init_from continues a LoRA; it needs {fix}"),
    Rule(("lora.text_encoder", "data.cache_text"),
         lambda c: c.lora.text_encoder and c.data.cache_text,
         "set data.cache_text=false",
         "lora.text_encoder=true trains the text encoder, whose outputs then change every step; "
         "data.cache_text cannot serve it: {fix}"),
    # train.method=embedding (textual inversion): the new token's vectors train through the text encoders
    Rule(("train.method", "embedding.token"),
         lambda c: c.train.method == "embedding" and not c.embedding.token,
         "name the new word captions use, e.g. --set embedding.token='<sks>'",
         "train.method=embedding trains a new word's embedding; embedding.token is empty: {fix}"),
    Rule(("embedding.token", "train.method"),
         lambda c: bool(c.embedding.token) and c.train.method != "embedding",
         "train.method=embedding",
         "embedding.token names the word textual inversion trains; it needs {fix}"),
    Rule(("train.method", "data.cache_text"),
         lambda c: c.train.method == "embedding" and c.data.cache_text,
         "set data.cache_text=false",
         "train.method=embedding trains the new token's vectors, so the text encoders' outputs change every "
         "step; data.cache_text cannot serve it: {fix}"),
    Rule(("train.method", "memory.optimizer_offload"),
         lambda c: c.train.method == "embedding" and c.memory.optimizer_offload != "none",
         "set memory.optimizer_offload=none",
         "train.method=embedding trains a few KB of weights: memory.optimizer_offload="
         "{memory.optimizer_offload} would move their AdamW state off the GPU to save nothing; {fix}"),
    Rule(("train.text_encoder_lr", "train.method"),
         lambda c: bool(c.train.text_encoder_lr) and c.train.method == "embedding",
         "set train.text_encoder_lr=0",
         "train.text_encoder_lr trains the whole text encoder; train.method=embedding trains only the new "
         "token's vectors: {fix}"),
    Rule(("output.validate_every", "data.validation_dir", "data.validation_split"),
         lambda c: bool(c.output.validate_every and not (c.data.validation_dir or c.data.validation_split)),
         "set data.validation_dir or data.validation_split",
         "output.validate_every is set but there is no validation set: {fix}"),
    Rule(("train.text_encoder_lr", "train.method"),
         lambda c: bool(c.train.text_encoder_lr) and c.train.method == "lora",
         "with train.method=lora use lora.text_encoder=true instead",
         "train.text_encoder_lr trains the whole text encoder; {fix}"),
    Rule(("train.text_encoder_lr", "data.cache_text"),
         lambda c: bool(c.train.text_encoder_lr) and c.data.cache_text,
         "set data.cache_text=false",
         "train.text_encoder_lr trains the text encoder, whose outputs then change every step; data.cache_text "
         "cannot serve it: {fix}"),
    Rule(("train.text_encoder_lr", "memory.fused_backward"),
         lambda c: bool(c.train.text_encoder_lr) and c.memory.fused_backward,
         "set one of them off",
         "train.text_encoder_lr trains a second parameter group; memory.fused_backward=true steps one weight "
         "at a time: {fix}"),
    Rule(("train.text_encoder_lr", "memory.optimizer_offload"),
         lambda c: bool(c.train.text_encoder_lr) and c.memory.optimizer_offload != "none",
         "set memory.optimizer_offload=none or train.text_encoder_lr=0",
         "train.text_encoder_lr steps the text encoder on the device; memory.optimizer_offload="
         "{memory.optimizer_offload} offloads only the UNet: {fix}"),
    Rule(("memory.fused_backward", "train.max_grad_norm"),
         lambda c: c.memory.fused_backward and bool(c.train.max_grad_norm),
         "set train.max_grad_norm off or fused_backward=false",
         _fused_needs_whole_gradient("train.max_grad_norm")),
    Rule(("memory.fused_backward", "train.gradient_accumulation_steps"),
         lambda c: c.memory.fused_backward and c.train.gradient_accumulation_steps != 1,
         "set train.gradient_accumulation_steps off or fused_backward=false",
         _fused_needs_whole_gradient("train.gradient_accumulation_steps")),
    Rule(("memory.fused_backward", "data.class_dir"),
         lambda c: c.memory.fused_backward and bool(c.data.class_dir),
         "set data.class_dir off or fused_backward=false",
         _fused_needs_whole_gradient("data.class_dir")),

    # several processes (`mode` is what memory.distributed resolves to; `why` says it, "memory.distributed=ddp")
    Rule(("memory.distributed", "memory.optimizer_offload"),
         lambda c: c.mode == "ddp" and c.memory.optimizer_offload != "none",
         "use memory.distributed=fsdp with memory.optimizer_offload=cpu (FSDP2's CPU offload), or "
         "optimizer_offload=none",
         "{why} averages gradients after backward, but memory.optimizer_offload={memory.optimizer_offload} "
         "takes each one during backward; {fix}", of_launch=True),
    Rule(("memory.distributed", "memory.param_offload"),
         lambda c: c.mode == "ddp" and c.memory.param_offload != "none",
         "use memory.distributed=fsdp (it gathers one block at a time)",
         "{why} cannot average the gradients of weights streamed by memory.param_offload="
         "{memory.param_offload}; {fix}", of_launch=True),
    Rule(("memory.distributed", "train.method"),
         lambda c: c.mode == "fsdp" and c.train.method == "lora",
         "use memory.distributed=ddp",
         "{why} shards a full fine-tune; train.method=lora trains a few MB: {fix}", of_launch=True),
    Rule(("memory.distributed", "memory.precision"),
         lambda c: c.mode == "fsdp" and c.memory.precision == "fp16",
         "memory.precision=bf16 or fp32",
         "{why} needs {fix} (fp16 loss scaling over shards is not supported)", of_launch=True),
    Rule(("memory.distributed", "memory.optimizer"),
         lambda c: c.mode == "fsdp" and c.memory.optimizer != "adamw",
         "set memory.optimizer=adamw, or use memory.distributed=ddp",
         "{why} steps torch AdamW on each rank's shards; memory.optimizer={memory.optimizer} would take its "
         "statistics per shard: {fix}", of_launch=True),
    Rule(("memory.distributed", "memory.optimizer_offload"),
         lambda c: c.mode == "fsdp" and c.memory.optimizer_offload == "nvme",
         "use memory.optimizer_offload=cpu (FSDP2's CPU offload)",
         "{why} with memory.optimizer_offload=nvme is not supported; {fix}", of_launch=True),
    Rule(("memory.distributed", "memory.param_offload"),
         lambda c: c.mode == "fsdp" and c.memory.param_offload != "none",
         "set memory.param_offload=none",
         "{why} already gathers one block's weights at a time; {fix}", of_launch=True),
    Rule(("memory.distributed", "train.ema_decay"),
         lambda c: c.mode == "fsdp" and bool(c.train.ema_decay),
         "use memory.distributed=ddp, or train.ema_decay=0",
         "{why} shards the weights; train.ema_decay keeps a whole copy of them: {fix}", of_launch=True),
    Rule(("memory.distributed", "memory.fused_backward"),
         lambda c: c.mode != "none" and c.memory.fused_backward,
         "set memory.fused_backward=false",
         "{why} averages gradients after backward; memory.fused_backward=true steps each weight during it, "
         "before they are averaged: {fix}", of_launch=True),
    Rule(("memory.distributed", "lora.text_encoder"),
         lambda c: c.mode != "none" and c.lora.text_encoder,
         "start one process",
         "{why} averages the UNet's gradients only; lora.text_encoder=true is not supported with several "
         "processes", of_launch=True),
    Rule(("memory.distributed", "train.method"),
         lambda c: c.mode != "none" and c.train.method == "embedding",
         "start one process",
         "{why} averages the UNet's gradients only; train.method=embedding trains the text encoders' new "
         "token rows and is not supported with several processes", of_launch=True),
    Rule(("memory.distributed", "train.text_encoder_lr"),
         lambda c: c.mode != "none" and bool(c.train.text_encoder_lr),
         "start one process",
         "{why} averages the UNet's gradients only; train.text_encoder_lr={train.text_encoder_lr} is not "
         "supported with several processes", of_launch=True),
    # [data] caption randomness against the text cache (cache_text with shuffle_tags is above)
    Rule(("data.cache_text", "data.tag_dropout"),
         lambda c: c.data.cache_text and c.data.tag_dropout > 0,
         "set one of them the other way",
         "data.cache_text stores one embedding per caption; data.tag_dropout={data.tag_dropout} makes a new "
         "caption each time: {fix}"),
    Rule(("data.cache_text", "data.wildcards"),
         lambda c: c.data.cache_text and c.data.wildcards,
         "set one of them the other way",
         "data.cache_text stores one embedding per caption; data.wildcards picks a new line and option each "
         "time: {fix}"),
    # [data] masked loss
    Rule(("data.mask_dir", "data.masked_loss"),
         lambda c: bool(c.data.mask_dir) and not c.data.masked_loss,
         "set data.masked_loss=true to train with the masks, or clear data.mask_dir",
         "data.mask_dir is set but data.masked_loss is false, so no mask would be read: {fix}"),
    # [[data.subsets]] (issue 29): is_reg subsets are the class images of prior preservation
    Rule(("data.class_dir", "data.subsets"),
         lambda c: bool(c.data.class_dir) and _regularisation(c),
         "keep the is_reg subsets or data.class_dir, not both",
         "data.class_dir and the is_reg tables of data.subsets both give class (regularisation) images: {fix}"),
    Rule(("memory.fused_backward", "data.subsets"),
         lambda c: c.memory.fused_backward and _regularisation(c),
         "drop is_reg from data.subsets or set fused_backward=false",
         "memory.fused_backward=true steps each weight during backward, before the whole gradient exists; "
         "the is_reg tables of data.subsets need it all (a class loss after the instance loss): {fix}"),
    # [train]'s noise and loss knobs (issue 29); kohya takes huber_c/huber_schedule without a huber loss (unused)
    # and debiased_estimation with min_snr_gamma (both weights apply): so does sdtune
    Rule(("train.min_timestep", "train.max_timestep"),
         lambda c: bool(c.train.max_timestep) and c.train.min_timestep >= c.train.max_timestep,
         "set train.max_timestep above it (it is exclusive: min_timestep + 1 trains one timestep; 0: up to the "
         "schedule's end)",
         "train.min_timestep={train.min_timestep} leaves no timestep below train.max_timestep="
         "{train.max_timestep}: {fix}"),
    Rule(("train.logit_mean", "train.timestep_sampling"),
         lambda c: c.train.logit_mean != 0.0 and c.train.timestep_sampling != "logit_normal",
         "set train.timestep_sampling=logit_normal, or leave train.logit_mean at 0",
         "train.logit_mean={train.logit_mean} shapes logit-normal timesteps; train.timestep_sampling="
         "{train.timestep_sampling} does not draw them: {fix}"),
    Rule(("train.logit_std", "train.timestep_sampling"),
         lambda c: c.train.logit_std != 1.0 and c.train.timestep_sampling != "logit_normal",
         "set train.timestep_sampling=logit_normal, or leave train.logit_std at 1",
         "train.logit_std={train.logit_std} shapes logit-normal timesteps; train.timestep_sampling="
         "{train.timestep_sampling} does not draw them: {fix}"),
    Rule(("train.ip_noise_gamma_random_strength", "train.ip_noise_gamma"),
         lambda c: c.train.ip_noise_gamma_random_strength and not c.train.ip_noise_gamma,
         "set train.ip_noise_gamma (0.1 is usual), or turn the random strength off",
         "train.ip_noise_gamma_random_strength=true draws a strength up to train.ip_noise_gamma, which is 0 "
         "(off): {fix}"),
    Rule(("train.noise_offset_random_strength", "train.noise_offset"),
         lambda c: c.train.noise_offset_random_strength and not c.train.noise_offset,
         "set train.noise_offset (0.05-0.1 is usual), or turn the random strength off",
         "train.noise_offset_random_strength=true draws a strength up to train.noise_offset, which is 0 "
         "(off): {fix}"),
    Rule(("train.scale_v_pred_loss_like_noise_pred", "train.prediction_type"),
         lambda c: c.train.scale_v_pred_loss_like_noise_pred and c.train.prediction_type == "epsilon",
         "set train.prediction_type=v_prediction, or turn the scaling off",
         "train.scale_v_pred_loss_like_noise_pred=true weights a v-prediction loss; train.prediction_type="
         "epsilon trains the noise (kohya refuses it too): {fix}"),
    # [train] noise schedule (kohya warns: "zero_terminal_snr is enabled, but v_parameterization is not");
    # train.prediction_type="" (the model's own) is checked against the model when it loads (set_noise_schedule)
    Rule(("train.zero_terminal_snr", "train.prediction_type"),
         lambda c: c.train.zero_terminal_snr and c.train.prediction_type == "epsilon",
         "set train.prediction_type=v_prediction",
         "train.zero_terminal_snr=true makes the last timestep pure noise, from which "
         "train.prediction_type=epsilon cannot predict the noise: {fix}"),
    # [memory] compile (issue 30): tried on the CPU; the streamer's hooks inside a compiled block swap its
    # weights' storage (param.data), which torch.compile cannot trace; several processes are not tried yet
    Rule(("memory.compile", "memory.param_offload"),
         lambda c: c.memory.compile == "blocks" and c.memory.param_offload != "none",
         "set memory.compile=none (or memory.param_offload=none)",
         "memory.compile=blocks cannot trace the weights memory.param_offload={memory.param_offload} swaps in "
         "block by block: {fix}"),
    Rule(("memory.distributed", "memory.compile"),
         lambda c: c.mode != "none" and c.memory.compile == "blocks",
         "set memory.compile=none, or start one process",
         "{why} with memory.compile=blocks is not supported yet (compiled blocks are tried in one process "
         "only): {fix}", of_launch=True),
)


def _captions_change(data) -> bool:
    """Whether [data] or one of its subsets (tables, or before they are checked, their dicts) shuffles, drops
    tags or picks wildcards: a caption that changes each time it is used."""
    def changes(values) -> bool:
        get = values.get if isinstance(values, dict) else lambda key, default: getattr(values, key, default)
        return bool(get("shuffle_tags", None) or (get("tag_dropout", None) or 0) > 0 or get("wildcards", None))

    return changes(data) or any(changes(s) for s in data.subsets)


def _regularisation(c) -> bool:
    """Whether a data.subsets table is is_reg (tables, or before they are checked, their dicts)."""
    return any(s.get("is_reg", False) if isinstance(s, dict) else s.is_reg for s in c.data.subsets)

SECTIONS = ("model", "data", "train", "lora", "embedding", "memory", "output")


@dataclass(frozen=True)
class GivesWay:
    """A preset's lever that the run's method cannot use: `key` becomes `value` where `needs` holds, unless a
    `--set` gave it (which its rule above then refuses, naming both keys). `load_config` applies these."""

    key: str                       # "section.key" of the lever
    value: object                  # what the method needs it to be
    needs: Callable[..., bool]     # of a view with the sections as the preset and --set resolve them
    why: str                       # the reason, for the one line that says so


# A method trains in any preset's memory plan: what a plan sets that the method cannot serve gives way to it.
GIVE_WAY: tuple[GivesWay, ...] = (
    GivesWay("data.cache_text", False, lambda c: c.train.method == "embedding" or c.lora.text_encoder,
             "the text encoders run every step"),
    GivesWay("data.cache_text", False, lambda c: _captions_change(c.data),
             "the caption changes each time it is used (shuffle_tags, tag_dropout or wildcards, in [data] or a "
             "data.subsets table: kohya's shuffle_caption)"),
    GivesWay("memory.optimizer_offload", "none", lambda c: c.train.method in ("lora", "embedding"),
             "an adapter's few MB of AdamW state stay on the GPU"),
)


def _view(sections: dict, **launch) -> SimpleNamespace:
    """What a rule's predicate and text read: the sections by name (and the launch's `mode`, `why`)."""
    return SimpleNamespace(**sections, **launch)


def _first_broken(rules, view) -> str | None:
    return next((rule.message(view) for rule in rules if rule.broken(view)), None)


def check_section(name: str, section) -> None:
    """Refuse a section that breaks a rule whose keys all lie in it (`section`'s __post_init__)."""
    rules = [rule for rule in RULES if rule.sections == {name} and not rule.of_launch]
    message = _first_broken(rules, _view({name: section}))
    if message:
        raise SdtuneError(message)


def check(config) -> None:
    """Refuse a config that breaks a rule tying keys of two sections (`Config.__post_init__`)."""
    rules = [rule for rule in RULES if len(rule.sections) > 1 and not rule.of_launch]
    message = _first_broken(rules, _view({name: getattr(config, name) for name in SECTIONS}))
    if message:
        raise SdtuneError(message)


def distributed_refusals(config, mode: str, key: str) -> list[str]:
    """Why `config` cannot run as `mode` ("ddp" or "fsdp") of several processes, the first rule first;
    `key` names the setting as the user gave it ("memory.distributed (auto)")."""
    view = _view({name: getattr(config, name) for name in SECTIONS}, mode=mode, why=f"{key}={mode}")
    return [rule.message(view) for rule in RULES if rule.of_launch and rule.broken(view)]
