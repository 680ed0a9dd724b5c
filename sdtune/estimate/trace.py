"""One training step traced on meta-device parts, through the engine's own code: the trainer's placement
(`sdtune.train.placement.cast_parts`, `configure`, `stream`), the family's text encoding
(`Family.encode_tokens`) and the one objective (`sdtune.train.objective.batch_loss`), under a
`MemoryTracker` that labels every storage by category.

    trained = place(parts, plan, method, tracker)          # the weights, labelled as they are placed
    cond = encode(parts, plan, cfg, tracker, grad=False)   # one batch through the VAE and text encoder(s)
    milestones = step(parts, plan, cfg, method, tracker, cond, trained)   # forward and backward

What only the estimator adds is what the meta device cannot show: the CUDA semantics (`CudaSemantics`:
autocast's casts and the attention kernels' memory), entered through `batch_loss`'s `forward` hook with
the tracker's phase, and the device copies an optimizer tier makes of host-kept weights.
"""

from __future__ import annotations

import dataclasses
import functools
from contextlib import contextmanager

from sdtune.config import Config
from sdtune.estimate.cuda import CudaSemantics
from sdtune.estimate.memtrack import MemoryTracker
from sdtune.family.base import TextReading
from sdtune.family.meta import MetaModel
from sdtune.plan import Plan
from sdtune.train.method import Method, Trained

TOKENS = 77  # the tokenizers pad every caption to this length (CLIP's context)


def place(parts: MetaModel, plan: Plan, method: Method, tracker: MemoryTracker) -> Trained:
    """Cast the parts as the trainer does (`cast_parts` on the meta device, its weights labelled as they
    land); then, for a full fine-tune whose fp32 UNet the tier keeps on the host (`host_gradients`) or FSDP
    shards, the working-precision copies the device computes with (`sdtune.estimate.per_card` counts the
    FSDP shards themselves)."""
    from sdtune.optim.tier import tier_class
    from sdtune.train.placement import cast_parts

    trained = cast_parts(parts, plan, method, "meta", label=tracker.add)
    if not method.frozen_unet and (tier_class(plan).host_gradients or plan.distributed == "fsdp"):
        parts.unet.to(plan.working_dtype)
        if plan.param_offload != "cpu":  # streamed weights are counted as the streamer copies them in
            tracker.add(list(parts.unet.parameters()), "weights")
    return trained


def encode(parts: MetaModel, plan: Plan, cfg: Config, tracker: MemoryTracker, grad: bool) -> tuple:
    """Encode one batch as the trainer does: the VAE (no grad) and the text encoder(s) through the family's
    own encoding, differentiable with `grad` (what their backward needs counts as activations). Returns the
    UNet's text context and SDXL's `added_cond_kwargs` (None for SD 1.x/2.x)."""
    import torch

    dtype, batch, side = plan.working_dtype, cfg.train.batch_size, cfg.data.resolution
    with tracker, CudaSemantics():
        tracker.phase = "temporaries"
        if parts.vae is not None:
            vae_dtype = next(parts.vae.parameters()).dtype
            with torch.no_grad():
                parts.vae.encode(torch.empty(batch, 3, side, side, dtype=vae_dtype, device="meta"))
        if grad:
            tracker.phase = "activations"
        hidden, pooled = _text(parts, batch, dtype, grad, TextReading(cfg.data.max_token_length, cfg.train.clip_skip))
        added = None
        if parts.unet.config.addition_embed_type == "text_time":  # SDXL: pooled caption and six size numbers
            added = {"text_embeds": pooled, "time_ids": torch.empty(batch, 6, dtype=dtype, device="meta")}
    return hidden, added


def _text(parts: MetaModel, batch: int, dtype, grad: bool, reading: TextReading) -> tuple:
    """The text context [B, 77, cross_attention_dim] (152 or 227 long for long captions: `reading`) and SDXL's
    pooled embedding: from the family's own `encode_tokens`, or, with the encoders parked (a text cache), as
    the cache hands them over."""
    import torch

    config = parts.unet.config
    if not parts.text_encoders:
        pooled_width = (config.projection_class_embeddings_input_dim or 0) - 6 * (config.addition_time_embed_dim or 0)
        pooled = torch.empty(batch, pooled_width, dtype=dtype, device="meta") if pooled_width > 0 else None
        context = reading.tokens_read(TOKENS)
        return torch.empty(batch, context, config.cross_attention_dim, dtype=dtype, device="meta"), pooled
    parts.family.check_text(parts.text_encoders, reading.clip_skip)
    windows = (reading.windows,) if reading.windows > 1 else ()  # [B, windows, 77] as `tokenize` gives them
    tokens = [torch.zeros(batch, *windows, min(TOKENS, encoder.config.max_position_embeddings), dtype=torch.long,
                          device="meta") for encoder in parts.text_encoders]
    cond = parts.family.encode_tokens(parts.text_encoders, tokens, grad, reading.clip_skip)
    return cond.hidden, cond.pooled


def step(parts: MetaModel, plan: Plan, cfg: Config, method: Method, tracker: MemoryTracker, cond: tuple,
         trained: Trained) -> dict[str, dict[str, int]]:
    """The UNet configured and streamed as the trainer's placement does it, then `batch_loss` forward and
    backward with the tier's gradient handling on what trains; the tracker's categories at the end of
    forward and of backward."""
    import torch

    from sdtune.optim.tier import tier_class
    from sdtune.train.objective import Draw, Objective, batch_loss
    from sdtune.train.placement import configure, stream

    unet = parts.unet
    cuda = CudaSemantics(autocast=plan.working_dtype if plan.precision != "fp32" else None)
    # xformers is traced as SDPA: CudaSemantics gives both the memory-efficient kernels' footprint
    configure(unet, dataclasses.replace(plan, attention="sdpa"), checkpoint=_checkpoint(cuda, tracker))
    if plan.param_offload == "cpu":
        category = "frozen" if method.frozen_unet else "weights"
        stream(unet, method, plan, "meta", on_copy=lambda copy: tracker.relabel(copy, category))
    # each gradient leaves for the host tier, or is stepped and dropped (fused_backward), as it is made
    freed = tier_class(plan).host_gradients or plan.fused_backward
    for p in trained.all_params:
        p.register_post_accumulate_grad_hook(functools.partial(_on_grad, tracker, freed))
    side, batch = cfg.data.resolution // 8, cfg.train.batch_size
    latents = torch.empty(batch, unet.config.in_channels, side, side, device="meta")
    timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
    alphas_cumprod = torch.empty(1000, device="meta")
    milestones: dict[str, dict[str, int]] = {}
    hidden, added = cond
    with tracker:
        tracker.phase = "temporaries"
        predicts = cfg.train.prediction_type or parts.prediction_type  # train.prediction_type overrides the model's
        goal = Objective.from_config(cfg.train, alphas_cumprod, predicts)
        draw = Draw(torch.empty_like(latents), timesteps,
                    torch.empty_like(latents) if cfg.train.ip_noise_gamma else None)
        loss = batch_loss(unet, latents, draw, hidden, added, objective=goal,
                          forward=functools.partial(_forward, cuda, tracker, milestones))
        loss.backward()
        del loss
    return {**milestones, "backward_end": dict(tracker.current)}


@contextmanager
def _forward(cuda: CudaSemantics, tracker: MemoryTracker, milestones: dict):
    """Around the UNet's forward: CUDA semantics, and what it makes counts as activations; afterwards
    backward's temporaries (its recomputation re-enters the semantics)."""
    tracker.phase = "activations"
    with cuda:
        yield
    cuda.end_forward()
    milestones["forward_end"] = dict(tracker.current)
    tracker.phase = "temporaries"


def _checkpoint(cuda: CudaSemantics, tracker: MemoryTracker):
    """diffusers' checkpointing minus the RNG bookkeeping the meta device lacks; the recomputation in
    backward runs under the same CUDA semantics, and what it makes counts as activations."""
    from torch.utils.checkpoint import checkpoint

    def checkpointed(function, *args, **kwargs):
        def recompute(*args, **kwargs):
            if cuda.active():
                return function(*args, **kwargs)
            phase, tracker.phase = tracker.phase, "activations"
            with cuda:
                out = function(*args, **kwargs)
            tracker.phase = phase
            return out
        return checkpoint(recompute, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    return checkpointed


def _on_grad(tracker: MemoryTracker, freed: bool, param) -> None:
    tracker.relabel(param.grad, "gradients")
    if freed:
        param.grad = None  # OffloadAdamW copies it to the host, InBackward steps it: freed on the device
