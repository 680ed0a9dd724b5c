"""The export writes the model after the training state is gone: no optimizer state, no gradients, no tier
threads or host buffers, only the exported weights (the moving average's, here)."""

import gc
import threading
import weakref

import torch
from safetensors.torch import load_file
from support.helpers import prepared

from sdtune.export import run_output
from sdtune.train import loop as trainer


def test_the_training_state_is_freed_before_the_model_is_written(tiny_sd1, images, tmp_path, monkeypatch):
    """The host tier (its worker thread, buckets, moments), the data loader's thread, the gradients; the
    moving average, which is the model, stays and is what the folder holds."""
    import sdtune.export

    before = set(threading.enumerate())  # other tests' tiers may have left theirs
    run = prepared(tiny_sd1, images, tmp_path, "train.max_steps=1", "train.ema_decay=0.5",
                   "output.save_precision=fp32", "memory.optimizer_offload=cpu")
    trainer.loop(run)
    average = {name: weight.clone() for name, weight in run.ema.weights().items() if name.startswith("unet.")}
    tier = run.tier.optimizer
    held = [weakref.ref(t) for state in tier.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    held += [weakref.ref(p) for p in getattr(tier, "_buckets", [])[:1] for p in (p.staging,)]
    at_export = {}
    write = sdtune.export.export_pipeline

    def looking(components, out):
        gc.collect()
        at_export.update(workers=[t.name for t in set(threading.enumerate()) - before if t.name.startswith("sdtune-")],
                         state=len(run.optimizer.state), alive=sum(ref() is not None for ref in held),
                         grads=sum(p.grad is not None for p in run.components.unet.parameters()))
        return write(components, out)

    monkeypatch.setattr(sdtune.export, "export_pipeline", looking)
    with run:
        run_output.export_run(run, "cpu")
    assert held and at_export == {"workers": [], "state": 0, "alive": 0, "grads": 0}
    written = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    for name, value in average.items():
        assert torch.equal(written[name.removeprefix("unet.")], value), name
