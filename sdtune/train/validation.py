"""Validation loss: the diffusion loss on held-out images at fixed timesteps with fixed noise, so that two
steps of a run, and two runs, are compared on exactly the same problem.

    examples, held_out = validation_set(cfg, scan.examples)   # data.validation_dir or validation_split
    losses = held_out.evaluate(run, evaluation_mode(run))   # {"validation_loss": ..., "ema_validation_loss": ...}

Every held-out image is center-cropped to its bucket, not flipped, with its own caption (no dropout or tag
shuffling), and evaluated at each of `TIMESTEP_FRACTIONS` of the noise schedule. The VAE's sample, the noise
and the order are drawn from seeds of their own, the same at every evaluation: only the weights change.
The loss is plain MSE against the model's target on plain noise (`objective.Objective`'s defaults): no
min-SNR weighting and none of the noise and loss knobs, which kohya's validation applies; with them, a
run's knobs would change the problem it is scored on. With `data.masked_loss` the images' masks weight it
as they weight the training loss. Every rank of a launched run evaluates the whole set
(FSDP's forward is collective); the figures are the same on each.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from contextlib import AbstractContextManager

from sdtune.config import Config
from sdtune.data import BatchStream, Item, captions, fit, scan_folder
from sdtune.data.batches import until_loaded
from sdtune.errors import SdtuneError
from sdtune.train import objective

logger = logging.getLogger(__name__)

TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)  # where in the noise schedule each image is evaluated
SEED = 2**41  # the validation draws' seeds: SEED + batch index, apart from the training's


def hold_out(examples: list, share: float, seed: int) -> tuple[list, list]:
    """(training, held out): a `share` of `examples` (at least one) drawn with `seed`, both in scan order."""
    count = max(1, round(share * len(examples)))
    if count >= len(examples):
        raise SdtuneError(f"data.validation_split={share} holds out {count} of {len(examples)} images and "
                          "leaves none to train on: lower it, or name a data.validation_dir")
    held = set(random.Random(seed).sample(range(len(examples)), count))
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def validation_set(cfg: Config, examples: list) -> tuple[list, Validation | None]:
    """The training examples and the validation set of `cfg` (None without one)."""
    data = cfg.data
    if data.validation_split:
        examples, held = hold_out(examples, data.validation_split, cfg.train.seed)
        logger.info(f"{len(held):,} images held out for the validation loss "
                    f"(data.validation_split={data.validation_split})")
    elif data.validation_dir:
        scan = scan_folder(data.validation_dir, data)
        for skip in scan.skipped:
            logger.info(f"skipped {skip.path} ({skip.kind}): {skip.detail}")
        held = scan.examples
        logger.info(f"{len(held):,} validation images from {data.validation_dir}")
    else:
        return examples, None
    return examples, Validation(held, cfg)


def _own_subsets(data) -> tuple:
    """The subsets a held-out image of data.validation_split keeps: its caption (prefix, suffix, separators)
    and its mask are its subset's; `batches` crops and flips none at random. data.validation_dir's images are
    no subset's."""
    return data.subsets if data.validation_split else ()


class Validation:
    """The held-out images and the fixed problem they pose: their batches, then `evaluate`."""

    def __init__(self, examples: list, cfg: Config):
        fixed = dataclasses.replace(cfg.data, random_flip=False, caption_dropout=0.0, shuffle_tags=False,
                                    center_crop=True, loader_threads=0,  # one fixed problem (`batches`), with
                                    subsets=_own_subsets(cfg.data))      # the subsets' captions and masks
        self.examples, self.batch_size = examples, cfg.train.batch_size
        self.stream = BatchStream(examples, fixed, self.batch_size, cfg.train.seed)

    def batches(self) -> list[list[Item]]:
        """The set in fixed batches of one bucket each; an image that failed to load is left out."""
        stream, batches = self.stream, []
        for bucket in sorted(stream.members):
            usable = [i for i in stream.members[bucket] if stream.examples[i].image not in stream.failed]
            items = []
            for i in usable:
                resized, crop = fit(stream.sizes[i], bucket, True, random.Random(0))  # center: no draw used
                own = stream.cfg_of(stream.examples[i])  # its subset's prefix and suffix, no randomness
                caption = captions.fixed(stream.examples[i].caption, own)
                items.append(Item(stream.examples[i], bucket, resized, crop, False, caption))
            batches += [items[start:start + self.batch_size] for start in range(0, len(items), self.batch_size)]
        return batches

    def evaluate(self, run, mode: AbstractContextManager) -> dict[str, float]:
        """The validation loss of the trained weights, and of their moving average with `train.ema_decay`,
        inside `mode` (the trainer's evaluation mode: eval, autocast, the encoders on the device)."""
        with mode:
            losses = {"validation_loss": self._loss(run)}
            if run.ema is not None:
                with run.ema.applied():
                    losses["ema_validation_loss"] = self._loss(run)
        return losses

    def _loss(self, run) -> float:
        import torch

        def every_batch() -> list[tuple[float, int]]:  # again without an image that failed (until_loaded)
            with torch.no_grad():
                return [self._batch_loss(run, b, items) for b, items in enumerate(self.batches())]

        total = until_loaded(every_batch)
        if not total:
            raise SdtuneError("every validation image became unusable during the run (deleted, broken or "
                              "replaced): restore them, then continue with --resume")
        return sum(value * n for value, n in total) / sum(n for _, n in total)

    def _batch_loss(self, run, index: int, items: list[Item]) -> tuple[float, int]:
        """(mean loss, images) of one batch over every fixed timestep."""
        import torch

        c, plan, alphas = run.components, run.plan, run.alphas_cumprod
        plain = objective.Objective(alphas_cumprod=alphas, prediction_type=c.prediction_type)
        generator = torch.Generator(plan.device).manual_seed(SEED + index)
        latents, mask = run.features.latents_and_mask(self.stream, items, generator)
        cond = run.features.text([item.caption for item in items])
        added = c.family.added_cond(cond, items, latents.device, plan.working_dtype)
        values = []
        for fraction in TIMESTEP_FRACTIONS:
            noise = objective.sample_noise(latents.shape, generator, 0.0, latents.device, latents.dtype)
            timesteps = torch.full((len(items),), int(fraction * len(alphas)), device=latents.device)
            values.append(objective.batch_loss(run.placement.unet, latents, objective.Draw(noise, timesteps),
                                               cond.hidden, added, objective=plain, mask=mask).item())
        return sum(values) / len(values), len(items)
