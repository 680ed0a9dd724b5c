"""What a finished run leaves: its model exported from the trained weights, and `summary.json`.

    result = export_run(run, preset="rtx3050")   # the summary; the run is closed
    check_export_space(run)                                  # output.keep_checkpoints=0: room first

For a full fine-tune the diffusers folder (and the single file) is written from the fp32 trained weights:
the EMA's with train.ema_decay, the tier's masters with an offload tier, every rank's shards under FSDP
(gathered to rank 0); a LoRA run writes its two LoRA files instead, a textual inversion its
`embedding.safetensors`. Then `summary.json`, and the resume
checkpoints go unless output.keep_final_state. What of a `Run` each part takes is decided here, not in
`sdtune.run`, which only orchestrates.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import nullcontext

from sdtune.train import store
from sdtune.train.state import Run
from sdtune.util import run_folder

logger = logging.getLogger(__name__)

def export_run(run: Run, preset: str) -> dict:
    """The diffusers folder (and the single file) from the fp32 trained weights, or a LoRA run's two LoRA
    files; `summary.json`. Returns the summary (`preset` names the preset trained); closes the run."""
    if run.placement.sharded:  # every rank sends its shards; rank 0 exports a plain UNet of them
        from sdtune.train.parallel import unsharded_copy

        weights = run.placement.weights()
        if run.world.main:
            run.components.unet = unsharded_copy(run.components.unet, weights)
    if not run.world.main:
        run.close()
        return {"preset": preset, **summary(run)}
    if run.placement.method.adapter:  # what an adapter's run writes, by its file: a LoRA's two, or an embedding
        return ADAPTER_EXPORTS.get(run.placement.weights_file, _export_lora)(run, preset)
    _take_exported_weights(run)
    _release_training_state(run)
    result = {"preset": preset, **summary(run), "single_file": _write_model(run)}
    _leave(run, result)
    return result


def _take_exported_weights(run: Run) -> None:
    """Put the weights the model is exported with into its modules: the EMA's where there is one, else the
    tier's fp32 masters where they do not live in the UNet itself."""
    from sdtune.family.base import TEXT_ENCODER_NAMES

    if run.ema is not None:  # the moving average is the model; the raw weights stay in the last checkpoint
        encoders = zip(TEXT_ENCODER_NAMES, run.components.text_encoders, strict=False)
        parts = {"unet": run.components.unet, **dict(encoders)}
        for name, weight in run.ema.weights().items():
            part, _, key = name.partition(".")
            parts[part].get_parameter(key).data = weight
    elif run.tier.host_gradients:  # the masters live in the tier, not in the UNet's working weights
        for name, weight in run.placement.weights().items():
            run.components.unet.get_parameter(name).data = weight


def _release_training_state(run: Run) -> None:
    """Free what only training needed before the model is written, so that the export's peak stays under the
    training's: the tier (its threads, host buffers and the nvme tier's state file, whose copy is in the last
    checkpoint), the optimizer's state, the gradients, and the moving average's own copy once it is the
    model's weights (`_take_exported_weights`), and the data loader's threads and prefetched batches."""
    import gc

    from sdtune.train.ema import DeviceEMA

    run.close()
    for stream in (run.stream, run.class_stream):
        if stream is not None:
            stream.close()
    optimizer = run.optimizer
    for each in (optimizer, *getattr(optimizer, "inner", ())):  # fused_backward: one optimizer a parameter
        each.state.clear()
    for module in (run.components.unet, *run.placement.modules.values()):
        for p in module.parameters():
            p.grad = None
    if isinstance(run.ema, DeviceEMA):  # the parameters hold its tensors now: once cast, nothing keeps them
        run.ema.average.clear()
        run.ema.params.clear()
    gc.collect()
    _trim_heap()


def _trim_heap() -> None:
    """Hand the heap's freed pages back to the system (glibc's `malloc_trim`): tensors under its mmap threshold
    (up to 32 MiB once tensors were freed, most of a UNet's) come from the heap, and what they leave stays in
    the resident set, for this process alone, until trimmed. Nothing where the C library has no such call."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator returns memory its own way
        pass


def _write_model(run: Run) -> dict:
    """The diffusers folder and, with output.single_file, the single file; what became of the latter."""
    from sdtune.export import SINGLE_FILE, export_pipeline, export_single_file
    from sdtune.plan import torch_dtype

    output = run.cfg.output
    for module in _trained(run):  # what the diffusers folder holds of them; the single file casts each part itself
        module.to(torch_dtype(output.save_precision))
    with _writing_model(run, _model_bytes(run)):
        export_pipeline(run.components, run.out_dir)
        single = {"written": False, "reason": "output.single_file is false"}
        if output.single_file:
            written = export_single_file(run.components, run.out_dir, precision=output.save_precision)
            for note in written.notes:
                logger.info(f"{SINGLE_FILE}: {note}")
            if written.path is None:
                logger.info(f"{SINGLE_FILE} not written: {written.reason}")
            single = {"written": written.path is not None, "reason": written.reason}
    return single


def _trained(run: Run) -> list:
    """The full fine-tune's trained modules, which the diffusers folder holds in output.save_precision."""
    return list(run.placement.modules.values())  # the UNet, and the text encoder(s) where they train


def check_export_space(run: Run) -> None:
    """With output.keep_checkpoints=0 no checkpoint could write the model once the export finds the disk
    too full, and every step would be lost: its free space is checked before the first step (every rank
    stops)."""
    from sdtune.util.files import check_space_all_ranks

    check_space_all_ranks(run.world, run.out_dir, _export_bytes(run) if run.world.main else 0, "the trained model",
                          "output.keep_checkpoints=0 keeps no checkpoint to write it from after the run: free "
                          "space there first, choose another --out, or set output.keep_checkpoints=1")


def _export_bytes(run: Run) -> int:
    """Bytes the export needs free: a LoRA run's two files (in fp32 at most), or `_model_bytes`."""
    from sdtune.util.files import tensor_bytes

    if run.placement.method.adapter:
        return 2 * tensor_bytes(run.placement.weights()) + 2**20
    return _model_bytes(run)


def _model_bytes(run: Run) -> int:
    """Bytes the export writes less those of the files it replaces: the diffusers folder (each part in its
    dtype, the trained ones in output.save_precision, cast or not yet) and the single file (every part in
    it)."""
    from sdtune.export import SINGLE_FILE, single_file_bytes
    from sdtune.plan import torch_dtype
    from sdtune.util.files import folder_bytes, tensor_bytes

    parts, trained = [run.components.unet, run.components.vae, *run.components.text_encoders], _trained(run)
    saved = torch_dtype(run.cfg.output.save_precision).itemsize
    folder = sum(tensor_bytes(part.state_dict()) for part in parts if not any(part is t for t in trained))
    folder += sum((saved if t.is_floating_point() else t.element_size()) * t.numel()
                  for part in trained for t in part.state_dict().values())
    single = single_file_bytes(run.components, run.cfg.output.save_precision)
    replaced = sum(folder_bytes(run.out_dir / name) for name in ("unet", "vae", "text_encoder", "text_encoder_2",
                                                                 SINGLE_FILE))
    return folder + (single if run.cfg.output.single_file else 0) + 2**20 - replaced


def _writing_model(run: Run, needed: int):
    """Refuse to start the export without `needed` bytes free, and turn one the disk refuses all the same into
    one line; either way the last checkpoint holds the trained weights and --resume writes the model again."""
    from sdtune.util.files import check_space, disk_errors

    latest = store.latest_checkpoint(run.out_dir, report=False)
    fix = (f"free space there and run the same command with --resume: it writes the model from {latest}"
           if latest else "free space there first: output.keep_checkpoints=0 keeps no checkpoint to write it from")
    check_space(run.out_dir, needed, "the trained model", fix)
    return disk_errors(run.out_dir, "the trained model", fix, needed)


def _leave(run: Run, result: dict) -> None:
    """`summary.json`, with what the run leaves on disk (`result["disk"]`); then, unless
    output.keep_final_state, the resume checkpoints are deleted (after the summary: a run killed in between
    keeps them)."""
    from sdtune.export import write_json
    from sdtune.util.files import folder_bytes
    from sdtune.util.run_folder import SUMMARY

    root, keep = run_folder.checkpoint_root(run.out_dir), run.cfg.output.keep_final_state
    checkpoints = folder_bytes(root)
    result["disk"] = {"output_bytes": folder_bytes(run.out_dir) - (0 if keep else checkpoints),
                      "checkpoint_bytes": checkpoints, "checkpoints_kept": keep and checkpoints > 0}
    write_json(run.out_dir / SUMMARY, result)
    if not keep and root.exists():
        shutil.rmtree(root)


def _export_lora(run: Run, preset: str) -> dict:
    from sdtune.export.lora_files import kohya_metadata, save_files
    from sdtune.lora.algorithms import algorithm_of

    modules, family = run.placement.lora, run.components.family
    result = {"preset": preset, **summary(run)}
    with (run.ema.applied() if run.ema is not None else nullcontext(),  # the moving average is the LoRA
          _writing_model(run, _export_bytes(run))):
        files = save_files(modules, family, run.out_dir,
                           kohya_metadata(run.cfg, run.components, result, len(run.stream.examples)), run.cfg.lora)
    run.close()
    result["lora_files"] = [path.name for path in files]
    result["adapter"] = run.placement.method.label
    result["lora_clients"] = algorithm_of(run.cfg.lora).clients
    _leave(run, result)
    return result


def _export_embedding(run: Run, preset: str) -> dict:
    """A textual inversion's `embedding.safetensors` (`sdtune.export.embedding_file`)."""
    from sdtune.export.embedding_file import embedding_metadata, save_embedding

    result = {"preset": preset, **summary(run)}
    with (run.ema.applied() if run.ema is not None else nullcontext(),  # the moving average is the embedding
          _writing_model(run, _export_bytes(run))):
        path = save_embedding(run.placement.modules, run.components.family, run.out_dir,
                              embedding_metadata(run.cfg, run.components, run.step))
    run.close()
    result["embedding_file"] = path.name
    _leave(run, result)
    return result


ADAPTER_EXPORTS = {"embedding.safetensors": _export_embedding}  # weights_file -> writer; other adapters: a LoRA


def summary(run: Run) -> dict:
    """What `summary.json` and `sdtune train` report of a run: its model, progress, plan and measures."""
    from sdtune.plan import peak_bytes

    plan, train = run.plan, run.cfg.train
    return {
        "method": run.cfg.train.method,
        "model_family": run.components.family.name, "pipeline_class": run.components.family.pipeline_class,
        "steps": run.step, "epoch": run.epoch, "steps_per_epoch": run.steps_per_epoch,
        "final_loss": run.losses[-1] if run.losses else None, "losses": run.losses,
        "seconds": round(run.seconds, 3), "seconds_per_step": round(run.seconds_per_step or 0.0, 4),
        "peak_memory_bytes": peak_bytes(plan),
        "peak_memory_kind": "cuda_max_reserved" if plan.device == "cuda" else "process_max_rss",
        "skipped_steps": run.skipped_steps, "device": plan.device, "precision": plan.precision,
        "attention": plan.attention, "gradient_checkpointing": plan.gradient_checkpointing,
        "optimizer": plan.optimizer, "optimizer_offload": plan.optimizer_offload,
        "param_offload": plan.param_offload, "host_pinning": run.tier.host_pinning, "batch_size": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "processes": run.world.size, "distributed": plan.distributed,
        "global_batch": train.batch_size * train.gradient_accumulation_steps * run.world.size,
    }
