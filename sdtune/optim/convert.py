"""AdamW state between the in-device optimizer and the host-RAM tier, for a `--resume` that moves
`memory.optimizer_offload` between none and cpu (the nvme tier's state file never moves).

In-device AdamW keeps one state per parameter; the host-RAM tier one flat state per bucket, plus the fp32
masters (taken from the checkpoint's `unet.safetensors`). Results then match the unchanged run to float
rounding, not bit for bit.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.errors import SdtuneError


class OtherTierState:
    """Stands in for `tier` when `checkpoint.load_checkpoint` restores state that the other tier saved."""

    def __init__(self, tier, unet, weights_file: Path):
        self.tier, self.unet, self.weights_file = tier, unet, weights_file

    def load_state_dict(self, saved: dict) -> None:
        from safetensors.torch import load_file

        if saved.get("state_file"):  # the host tier's checkpoint: its masters and moments are in that file
            saved = with_state_file(saved, self.weights_file.parent / saved["state_file"], self.unet)
        optimizer = self.tier.optimizer  # whole state dicts, masters included, in both directions
        optimizer.load_state_dict(convert_state(saved, optimizer.state_dict(), self.unet, load_file(self.weights_file)))

    def load_files(self, folder: Path) -> None:
        self.tier.load_files(folder)

    def restored_weights(self) -> dict:
        return {}  # read from the weights file: the masters there were converted from it


def with_state_file(saved: dict, path: Path, unet) -> dict:
    """The host tier's `checkpoint_state` `saved`, made whole from its state file `path` (each bucket's
    [master | exp_avg | exp_avg_sq], the buckets cut from `unet`'s trained parameters as the tier cuts them)."""
    import numpy as np
    import torch

    from sdtune.offload.layout import partition

    numels = [p.numel() for p in unet.parameters() if p.requires_grad]
    lengths = [sum(numels[i] for i in r) for r in partition(numels)]
    values = torch.from_numpy(np.fromfile(path, dtype=np.float32))
    if len(values) != 3 * sum(lengths):
        raise SdtuneError(f"{path} does not match this model's optimizer state (size differs)")
    state, masters, offset = {}, [], 0
    for index, n in enumerate(lengths):
        master, exp_avg, exp_avg_sq = values[offset:offset + 3 * n].split(n)
        masters.append(master)
        state[index] = {**saved["state"][index], "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        offset += 3 * n
    return {**saved, "state": state, "masters": masters}


def convert_state(saved: dict, target: dict, unet, weights: dict) -> dict:
    """AdamW state `saved` by one tier, laid out as the other tier's `target` state dict lays it out."""
    import torch

    params = [(name, p) for name, p in unet.named_parameters() if p.requires_grad]  # the optimizer's order
    skip = ("params", "fused", "foreach", "capturable", "differentiable")  # how it runs, not what it computes
    groups = [{**new, **{k: v for k, v in old.items() if k not in skip}}
              for new, old in zip(target["param_groups"], saved["param_groups"], strict=True)]
    result = {"param_groups": groups, "state": {}}
    if "masters" in target:
        lengths = [len(master) for master in target["masters"]]
        result["masters"] = list(torch.cat([weights[name].reshape(-1).float() for name, _ in params]).split(lengths))
    if not saved["state"]:  # no step taken yet (or every one skipped): nothing but the masters to carry
        return result
    first = saved["state"][min(saved["state"])]
    if "masters" in saved:  # flat buckets, in parameter order
        buckets = [saved["state"][i] for i in sorted(saved["state"])]
        joined = {key: torch.cat([b[key] for b in buckets]) for key in ("exp_avg", "exp_avg_sq")}
    else:  # one state per parameter; one without (no gradient yet) has zero moments
        joined = {key: torch.cat([saved["state"][i][key].reshape(-1) if i in saved["state"]
                                  else torch.zeros(p.numel()) for i, (_, p) in enumerate(params)])
                  for key in ("exp_avg", "exp_avg_sq")}
    if "masters" in target:
        pieces = {key: value.split(lengths) for key, value in joined.items()}
        count = len(lengths)
    else:
        sizes = [p.numel() for _, p in params]
        pieces = {key: [t.view(p.shape) for t, (_, p) in zip(value.split(sizes), params, strict=True)]
                  for key, value in joined.items()}
        count = len(params)
    result["state"] = {i: {"step": first["step"].clone(), "exp_avg": pieces["exp_avg"][i].clone(),
                           "exp_avg_sq": pieces["exp_avg_sq"][i].clone()} for i in range(count)}
    return result
