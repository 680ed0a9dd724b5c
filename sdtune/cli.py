"""The `sdtune` command line: parse, build the config, call one function, render the result with rich.

    sdtune presets                      # the shipped memory plans
    sdtune train --preset rtx3050 --data ./images
    sdtune sample --ckpt out/ --prompt "a photo of sks dog"
    sdtune estimate-vram --preset all   # will a plan fit? (no GPU, no weights needed)
    sdtune data check ./images          # what training would see: counts, buckets, captions, problems

Nothing heavy is imported here (torch, diffusers): `sdtune --help` answers at once.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from sdtune.errors import SdtuneError

app = typer.Typer(
    help="Fine-tune the full UNet of Stable Diffusion on one consumer GPU, planned by memory presets.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
)
console = Console(stderr=True, highlight=False, soft_wrap=True)  # soft wrap: an error stays one line

SET_HELP = ("Override one config key, e.g. --set train.learning_rate=2e-5 (repeatable). "
            "`sdtune presets NAME` lists every key.")


def user_errors(command):
    """Render `SdtuneError` as one red line and exit 2; anything else is a bug and keeps its traceback.
    Under a launcher (torchrun) the line names the rank it happened on. While the command runs, sdtune's
    log lines are printed (`_log_lines`)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with _log_lines():
                return command(*args, **kwargs)
        except SdtuneError as exc:
            from sdtune.util.world import launched_rank

            where = "" if launched_rank() is None else f"rank {launched_rank()}: "
            console.print(f"[bold red]error:[/] {where}{escape(str(exc))}")
            raise typer.Exit(2) from None

    return wrapper


class _ConsoleLines(logging.Handler):
    """Each record of the "sdtune" logger as one console line: a warning's label in yellow, so that it
    stands out of the run's chatter, and the text escaped (a path may hold [brackets])."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = escape(record.getMessage())
            if record.levelno >= logging.WARNING:
                console.print(f"[bold yellow]warning:[/] {text}")
            else:
                console.print(text)
        except Exception:  # logging's contract: a failing handler reports and lets the program go on
            self.handleError(record)


def _rank_zero(record: logging.LogRecord) -> bool:
    """Rank 0 speaks for a launched run; the other ranks only fail aloud (their errors name the rank)."""
    from sdtune.util.world import current_rank

    return current_rank() == 0


@contextmanager
def _log_lines():
    """For one command: sdtune's INFO and WARNING records on the console (rank 0's), and not also through
    the root logger; as it was afterwards (tests run many commands in one process)."""
    logger = logging.getLogger("sdtune")
    handler = _ConsoleLines(logging.INFO)
    handler.addFilter(_rank_zero)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


class OnOom(str, Enum):
    stop = "stop"
    fallback = "fallback"


@app.command()
@user_errors
def train(
    preset: str = typer.Option(..., help="Memory plan: a shipped preset name (see `sdtune presets`), a .toml path, "
                               "or auto (the fastest plan the estimator fits into this GPU; cpu without one)."),
    data: Path | None = typer.Option(None, help="Folder of training images, searched recursively; captions from "
                                     "NAME.txt, metadata.jsonl/.csv or the file name (`sdtune data check DIR` shows "
                                     "what is found); or kohya's dataset config (a .toml with [[datasets]]); may be "
                                     "left out when the preset has [[data.subsets]]."),
    model: str | None = typer.Option(None, help="Base model: diffusers folder, .safetensors file or hub id."),
    out: Path = typer.Option(Path("out"), help="Output folder: diffusers pipeline, checkpoints, samples."),
    max_steps: int | None = typer.Option(None, min=1, help="Optimizer steps (overrides train.max_steps)."),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoint in --out."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    on_oom: OnOom = typer.Option(OnOom.stop, "--on-oom", help="When the GPU runs out of memory: stop with a "
                                 "message naming the next smaller memory plan, or fallback: continue from the "
                                 "newest checkpoint on it (same precision and results, slower)."),
    overwrite: bool = typer.Option(False, help="Allow an --out folder that is not empty and not an sdtune output "
                                   "folder, or that holds another run (its checkpoints are deleted)."),
):
    """Fine-tune the UNet of a Stable Diffusion model on a folder of images.

    Ctrl+C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint, prints the command that
    resumes the run and exits with 130 or 143."""
    from sdtune.run import Stopped, TrainRequest
    from sdtune.run import train as run_training
    from sdtune.train.metrics import ProgressSink

    request = TrainRequest(preset=preset, data=data, out=out, model=model, max_steps=max_steps, sets=tuple(set_),
                           resume=resume, overwrite=overwrite, on_oom=on_oom.value)
    try:
        result = run_training(request, progress=lambda total, epochs: ProgressSink(console, total, epochs),
                              status=console.status)
    except Stopped as exc:
        from sdtune.util.world import launched_rank

        if not launched_rank():  # rank 0 (or the one process) says how to resume
            console.print(f"[yellow]{escape(str(exc))}[/]")
        raise typer.Exit(exc.exit_code) from None
    from sdtune.util.world import launched_rank

    if launched_rank():  # ranks other than 0 stay quiet: rank 0 reports the run
        return
    console.print(f"done: {result['steps']} steps, final loss {result['final_loss']:.4f}, "
                  f"{result['seconds_per_step']:.3f} s/step, peak {_gib(result['peak_memory_bytes'])} "
                  f"({result['peak_memory_kind']}), {result['skipped_steps']} skipped steps")
    if "lora_files" in result:  # an adapter run: what it wrote, and how to use it
        diffusers = (f"pytorch_lora_weights.safetensors (diffusers: pipe.load_lora_weights('{out}')) and "
                     if "pytorch_lora_weights.safetensors" in result["lora_files"] else "")
        console.print(f"{result['adapter']} written to {out}/: {diffusers}lora.safetensors "
                      f"({result['lora_clients']}); `sdtune sample --ckpt {out}` draws with it, "
                      f"`sdtune merge --ckpt {out}` bakes it in")
    elif "embedding_file" in result:  # a textual inversion: its file, and how to use it
        console.print(f"embedding written to {out}/{result['embedding_file']} (AUTOMATIC1111, ComfyUI: copy it into "
                      "their embeddings folder named as the word prompts will use, e.g. my-dog.safetensors; diffusers: "
                      f"pipe.load_textual_inversion); `sdtune sample --ckpt {out}` draws with it")
    else:
        console.print(f"diffusers pipeline written to {out}/ ({result['pipeline_class']}.from_pretrained('{out}'))")
    console.print(escape(_disk_line(out, result["disk"])))


def _disk_line(out: Path, disk: dict) -> str:
    """What a finished run leaves on the disk, and whether its resume checkpoints were kept."""
    from sdtune.util.files import size_text

    held = f"{out}/ holds {size_text(disk['output_bytes'])}"
    if disk["checkpoints_kept"]:
        return (f"{held}, of which {size_text(disk['checkpoint_bytes'])} are resume checkpoints (kept: "
                "output.keep_final_state=true; --resume with more steps trains on)")
    if disk["checkpoint_bytes"]:
        return (f"{held}; its resume checkpoints ({size_text(disk['checkpoint_bytes'])}) were deleted "
                "(output.keep_final_state=true keeps them)")
    return f"{held}; no resume checkpoints were kept"


@app.command()
@user_errors
def sample(
    ckpt: str = typer.Option(..., help="A finished `sdtune train` --out folder (a full model, a LoRA or an "
                                       "embedding), a diffusers folder or a single-file .safetensors checkpoint."),
    prompt: str = typer.Option(..., help="What to draw."),
    negative_prompt: str = typer.Option("", help="What to steer away from (e.g. \"blurry, low quality\")."),
    num_images: int = typer.Option(4, min=1, help="How many images (image i uses seed + i)."),
    steps: int = typer.Option(30, min=1, help="Denoising steps."),
    seed: int = typer.Option(0, help="Seed of the first image."),
    height: int | None = typer.Option(None, help="Image height in pixels (default: the model's size)."),
    width: int | None = typer.Option(None, help="Image width in pixels (default: the model's size)."),
    guidance: float = typer.Option(7.5, min=0.0, help="Classifier-free guidance scale; 1 turns guidance off."),
    out: Path = typer.Option(Path("samples"), help="Folder for the PNGs and grid.png."),
    vae: str | None = typer.Option(None, help="A diffusers VAE folder to decode with instead of the model's own "
                                              "(e.g. an fp16-safe SDXL VAE)."),
    lora_scale: float = typer.Option(1.0, help="For a LoRA run's --ckpt: how strongly the LoRA applies "
                                               "(0: the base model, 1: as trained)."),
    embedding: list[str] = typer.Option([], help="A textual-inversion .safetensors file to load too (A1111/ComfyUI "
                                                 "layout, e.g. a run's embedding.safetensors); repeatable. Write its "
                                                 "word in --prompt."),
    embedding_token: list[str] = typer.Option([], help="The word of the i-th --embedding in prompts (default: the "
                                                       "one in the file's metadata, else the file's name)."),
    max_token_length: int | None = typer.Option(None, help="Prompt tokens read: 75, or 150/225 in 75-token windows "
                                                           "as kohya's (default: a run folder's "
                                                           "data.max_token_length, else 75)."),
    clip_skip: int | None = typer.Option(None, min=1, help="Read prompts from this text-encoder layer from the end, "
                                                           "2 the penultimate (default: a run folder's "
                                                           "train.clip_skip, else 1)."),
):
    """Generate images with a trained (or any diffusers) Stable Diffusion 1.x, 2.x or SDXL pipeline, or
    with a LoRA run's folder (its base model plus the LoRA) or a textual-inversion run's (its base model
    with its embedding)."""
    from sdtune.sample import sample as run_sample

    with console.status(f"sampling {num_images} image(s), {steps} steps"):
        result = run_sample(ckpt, prompt, num_images=num_images, steps=steps, seed=seed, height=height,
                            width=width, guidance=guidance, out_dir=str(out), vae=vae, lora_scale=lora_scale,
                            negative_prompt=negative_prompt, embeddings=tuple(embedding),
                            embedding_tokens=tuple(embedding_token), max_token_length=max_token_length,
                            clip_skip=clip_skip)
    for note in result.notes:
        console.print(f"note: {escape(note)}")
    for path in result.images:
        console.print(f"wrote {path}")
    console.print(f"wrote {result.grid}")


@app.command()
@user_errors
def merge(
    ckpt: Path = typer.Option(..., help="An adapter run's --out folder (lora.safetensors, config.toml)."),
    out: Path = typer.Option(..., help="Folder for the merged model: a diffusers pipeline and model.safetensors."),
    lora_scale: float = typer.Option(1.0, help="How strongly the LoRA is merged in (1: as trained)."),
    base: str | None = typer.Option(None, help="Merge into this base model instead of the one the LoRA was "
                                               "trained on (a diffusers folder, .safetensors file or hub id)."),
    config: str = typer.Option("", help="For a single-file --base: its configs, a bundled architecture (sd15, "
                                        "sd21, sdxl) or a diffusers folder (default: detected from the file)."),
    overwrite: bool = typer.Option(False, help="Write into an --out folder that is not empty."),
):
    """Merge a trained LoRA into its base model and write the result in both of sdtune's export formats:
    a diffusers pipeline folder and, when ComfyUI/AUTOMATIC1111 can read it, model.safetensors."""
    from sdtune.merge import merge as run_merge

    with console.status(f"merging {ckpt} into its base model"):
        result = run_merge(ckpt, out, scale=lora_scale, base=base, config=config, overwrite=overwrite)
    for note in result.notes:
        console.print(f"note: {escape(note)}")
    console.print(f"merged model written to {out}/ ({result.pipeline_class}.from_pretrained('{out}'))"
                  + (f" and {result.single_file}" if result.single_file else ""))


ESTIMATE_ROWS = {"weights": "trained weights", "frozen": "frozen weights", "gradients": "gradients",
                 "optimizer_state": "optimizer state", "activations": "activations", "temporaries": "temporaries",
                 "allocator_overhead": "allocator overhead", "cuda_context": "CUDA context"}


@app.command("estimate-vram")
@user_errors
def estimate_vram(
    model: str | None = typer.Option(None, help="A diffusers folder, a .safetensors checkpoint or an architecture "
                                                "(sd15, sd21, sdxl); default: the preset's model when it is a "
                                                "local path, else sd15."),
    preset: str = typer.Option("rtx3050", help="Memory plan: a preset name, a .toml path, auto (the plan `train "
                                                 "--preset auto` would pick on this machine) or all (every GPU "
                                                 "preset of the model's family and of train.method; a "
                                                 "textual inversion's: the LoRA ones, without the text cache)."),
    resolution: int | None = typer.Option(None, min=8, help="Image side in pixels; sets data.resolution "
                                                            "(default: the preset's, 512 for the GPU presets)."),
    batch_size: int | None = typer.Option(None, min=1, help="Images per forward pass; sets train.batch_size "
                                                            "(default: the preset's, 1 for the GPU presets)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + " --resolution and --batch-size win over --set."),
    gpus: int = typer.Option(1, min=1, help="Per-card figures for this many GPUs (processes) under the plan's "
                                            "memory.distributed: ddp (auto) or fsdp."),
    host_ram_gib: float | None = typer.Option(None, "--host-ram", min=0.5, help="Judge host RAM against this many "
                                              "GiB (another machine's) instead of this machine's."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON document (every figure in bytes), no table."),
):
    """Estimate the GPU memory of a plan before training, without a GPU and without weights.

    One training step of the model's real architecture is traced on torch's meta device under the plan.
    The figures are the peak on the GPU during that step, by category; "peak reserved" adds the CUDA
    caching allocator's rounding and fragmentation and compares with torch.cuda.max_memory_reserved();
    "total" adds the CUDA context on top and is what the card must hold. Host RAM is what offloaded state
    needs on the host (pinned buffers included); disk is the nvme tier's state file. Each plan's verdict
    weighs both: the card, and the host RAM (this machine's, or --host-ram) of which a plan may use 90%,
    as --preset auto allows.
    """
    import json

    from sdtune.config import load_config
    from sdtune.estimate.auto import GIB, SAFETY, detect_gpu, host_ram, model_family, pick_plan, run_method

    overrides = [*set_, *([f"data.resolution={resolution}"] if resolution else []),
                 *([f"train.batch_size={batch_size}"] if batch_size else [])]
    ram = int(host_ram_gib * GIB) if host_ram_gib else host_ram()
    pick, results = None, []
    if preset == "auto":
        if gpus > 1:
            raise SdtuneError("--preset auto picks a plan for one GPU; with --gpus name a preset, or all")
        with console.status("--preset auto: estimating the memory plans"):
            pick = pick_plan(overrides, model, ram=ram)
        results = [pick.estimate] if pick.estimate is not None else []  # None: no GPU, the cpu preset
    if not results:
        from sdtune.estimate import remembered
        from sdtune.estimate.auto import method_presets

        family, method = model_family(set_, model), run_method(set_)  # "all": the model's family, the run's method
        names = method_presets(family, method) if preset == "all" else [preset]
        extra = pick.extra if pick else ()
        for name in [pick.preset] if pick else names:
            cfg, info = load_config(name, [*extra, *overrides])
            with console.status(f"tracing one training step under {info.name}"):
                results.append(remembered(cfg, info, model, gpus=gpus))  # a plan traced before: read back
    gpu = detect_gpu()
    if json_:
        gpu_doc = gpu and {"name": gpu.name, "total_memory": gpu.total_memory,
                           "fits": {est.preset: est.total <= gpu.total_memory for est in results}}
        host_doc = {"ram": ram, "from": "--host-ram" if host_ram_gib else "this machine",
                    "budget": ram and int(SAFETY * ram), "needs": {est.preset: _host_need(est) for est in results},
                    "fits": {est.preset: ram and _host_need(est) <= SAFETY * ram for est in results}}
        doc = {"gpu": gpu_doc, "host": host_doc, "estimates": [est.to_dict() for est in results]}
        if pick:
            doc["auto"] = {"preset": pick.preset, "extra": list(pick.extra), "reason": pick.reason,
                           "warning": pick.warning}
        typer.echo(json.dumps(doc, indent=2))
        return
    out = Console(highlight=False, soft_wrap=True)  # soft wrap: each line of text stays one line
    if pick:
        out.print(escape(pick.reason))
        if pick.warning:
            out.print(f"[bold yellow]warning:[/] {escape(pick.warning)}")
    seconds = sum(est.seconds for est in results)
    per = f" on each of {gpus} cards ({results[0].distributed})" if gpus > 1 else ""
    out.print(f"GPU memory at the peak of one training step{per}, estimated without a GPU in {seconds:.1f} s:")
    out.print(_estimate_table(results), soft_wrap=False)  # the table wraps its cells to the terminal's width
    out.print("peak reserved compares with torch.cuda.max_memory_reserved(); total adds the CUDA context "
              "and is what the card must hold")
    for est in results:
        for note in est.notes:
            if not (pick and note in pick.reason):  # --preset auto's line said it already
                out.print(f"note: {est.preset}: {note}")
    if gpu is None:
        out.print("no GPU detected: the verdicts above are against each preset's card")
    else:
        verdicts = ", ".join(f"{est.preset} [green]fits[/]" if est.total <= gpu.total_memory
                             else f"{est.preset} [red]does not fit[/]" for est in results)
        out.print(f"GPU detected: {gpu.name}, {gpu.total_memory / 2**30:.2f} GiB: {verdicts} "
                  f"(--preset auto keeps {1 - SAFETY:.0%} of it free)")
    where = "--host-ram" if host_ram_gib else "this machine's"
    out.print(f"host RAM: {_ram_label(ram)} ({where}); a plan may use {SAFETY:.0%} of it, as --preset auto allows"
              if ram else "host RAM: this machine's is unknown; pass --host-ram GiB to judge the plans against it")
    for est in results:
        out.print(_verdict(est, gpu, ram, SAFETY))


def _host_need(est) -> int:
    """The host RAM a plan needs; on the CPU the device's memory is host RAM too."""
    return est.host_ram + (est.total if est.device == "cpu" else 0)


def _gib_figure(n: int) -> str:
    """Bytes as GiB to one decimal, or two below 1 GiB (the cpu preset's model: 0.04, not 0.0)."""
    gib = n / 2**30
    return f"{gib:.1f}" if gib >= 0.95 else f"{gib:.2f}"


def _ram_label(ram: int) -> str:
    return f"{round(ram / 2**30, 1):g} GiB"


def _verdict(est, gpu, ram: int | None, safety: float) -> str:
    """One plan's whole verdict: "rtx3050: fits 8 GB, needs 11.2 GiB host RAM: too much for 16 GiB"."""
    if est.device == "cpu":
        card = "runs on the CPU"
    elif gpu is not None:
        card = (f"[green]fits[/] {escape(gpu.name)}" if est.total <= gpu.total_memory
                else f"[red]does not fit[/] {escape(gpu.name)}")
    elif est.fits is None:
        card = f"needs {est.total / 2**30:.1f} GiB of VRAM"
    else:
        card = f"[green]fits {est.card_gib:g} GB[/]" if est.fits else f"[red]does not fit {est.card_gib:g} GB[/]"
    needs = f"needs {_gib_figure(_host_need(est))} GiB host RAM" + (
        f" and {est.disk / 2**30:.1f} GiB of disk in memory.offload_dir" if est.disk else "")
    if not ram:
        return f"{est.preset}: {card}, {needs}"
    host = (f"[green]fits {_ram_label(ram)}[/]" if _host_need(est) <= safety * ram
            else f"[red]too much for {_ram_label(ram)}[/]")
    return f"{est.preset}: {card}, {needs}: {host}"


def _estimate_table(results):
    from rich.table import Column, Table

    def gib(n: int) -> str:
        return f"{n / 2**30:.2f}"

    def verdict(est) -> str:
        if est.fits is None:
            return "no card named"
        return f"[green]fits {est.card_gib:g} GB[/]" if est.fits else f"[red]does not fit {est.card_gib:g} GB[/]"

    table = Table(Column("GiB", no_wrap=True), *(Column(est.preset, justify="right") for est in results))
    table.add_row("model", *(Path(est.model).name or est.model for est in results))
    table.add_row("image x batch", *(f"{est.resolution} px x {est.batch_size}" for est in results), end_section=True)
    allocated = ("weights", "frozen", "gradients", "optimizer_state", "activations", "temporaries")
    for key in allocated:
        table.add_row(ESTIMATE_ROWS[key], *(gib(est.categories.get(key, 0)) for est in results))
    table.add_row("peak allocated", *(gib(est.peak_allocated) for est in results), end_section=True)
    table.add_row(ESTIMATE_ROWS["allocator_overhead"],
                  *(gib(est.categories.get("allocator_overhead", 0)) for est in results))
    table.add_row("peak reserved", *(gib(est.peak_reserved) for est in results))
    table.add_row(ESTIMATE_ROWS["cuda_context"], *(gib(est.categories.get("cuda_context", 0)) for est in results))
    table.add_row("[bold]total[/]", *(f"[bold]{gib(est.total)}[/]" for est in results), end_section=True)
    table.add_row("host RAM", *(gib(est.host_ram) for est in results))
    table.add_row("disk (nvme)", *(gib(est.disk) for est in results), end_section=True)
    table.add_row("card", *(verdict(est) for est in results))
    return table


@app.command()
@user_errors
def presets(name: str | None = typer.Argument(None, help="Show this preset fully resolved, as TOML.")):
    """List the memory plans, each with what it needs (VRAM and host RAM, estimated at the preset's own model
    and size, a few seconds a preset), or print one resolved with every key and its meaning."""
    from rich import box
    from rich.table import Column, Table

    from sdtune.config import load_config, preset_names
    from sdtune.config.toml import to_toml

    if name:
        cfg, info = load_config(name)
        typer.echo(to_toml(cfg, info))
        return
    from sdtune.estimate import remembered
    from sdtune.train.method import method_for

    rows, names = [], preset_names()
    with console.status("estimating the presets' memory") as status:
        for i, preset in enumerate(names, 1):
            status.update(f"estimating each preset's memory at its own model and size: {preset} ({i} of "
                          f"{len(names)}, a few seconds each the first time)")
            cfg, info = load_config(preset)
            rows.append((cfg, info, remembered(cfg, info)))
    table = Table(Column("preset", no_wrap=True), "method", Column("card", no_wrap=True),
                  Column("VRAM", justify="right"), Column("RAM", justify="right"), "dtype", "recompute", "offload",
                  "batch", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0), title_justify="left",
                  title="VRAM and host RAM: GiB estimated at each preset's model and size")
    for cfg, info, est in rows:
        m = cfg.memory
        table.add_row(info.name, method_for(cfg).label,
                      f"{info.vram_gib:g} GB" if info.vram_gib else "-",
                      "-" if est.device == "cpu" else _gib_figure(est.total), _gib_figure(_host_need(est)),
                      m.precision, "on" if m.gradient_checkpointing else "off",
                      m.optimizer_offload + (" + weights" if m.param_offload != "none" else ""),
                      f"{cfg.train.batch_size}x{cfg.train.gradient_accumulation_steps}")
    out = Console(highlight=False)
    out.print(table)
    for note in _same_vram_notes([est for *_, est in rows]):
        out.print(note)
    out.print("recompute: activation checkpointing; `sdtune presets NAME` shows every key, `sdtune estimate-vram "
              "--preset NAME --model M` estimates your model")


def _same_vram_notes(estimates) -> list[str]:
    """A line for each set of GPU presets that need the same VRAM (to 0.1 GiB, as listed) but not the same
    host RAM: the card alone does not choose between them (sdxl-8gb and sdxl-12gb)."""
    groups: dict[float, list] = {}
    for est in estimates:
        if est.device != "cpu":
            groups.setdefault(round(est.total / 2**30, 1), []).append(est)
    notes = []
    for vram, group in groups.items():
        if len({round(_host_need(est) / 2**30, 1) for est in group}) < 2:
            continue
        names = [est.preset for est in group]
        needs = [f"{est.preset} {_gib_figure(_host_need(est))} GiB"
                 + (f" (and {est.disk / 2**30:.1f} GiB of disk)" if est.disk else "") for est in group]
        notes.append(f"{', '.join(names[:-1])} and {names[-1]} need the same VRAM ({vram:.1f} GiB) but not the "
                     f"same host RAM: {', '.join(needs)}")
    return notes


data_app = typer.Typer(help="Inspect a training folder without training.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
@user_errors
def data_check(
    folder: Path | None = typer.Argument(None, help="Folder of training images or kohya's dataset config (.toml), "
                                                    "as --data of `sdtune train` takes it; left out: the preset's "
                                                    "[[data.subsets]]."),
    preset: str = typer.Option("rtx3050", help="Memory plan whose [data] settings apply (resolution, buckets, "
                                               "smallest side, captions): a preset name or a .toml path."),
    model: str | None = typer.Option(None, help="Base model whose tokenizer measures the captions (default: the "
                                                "preset's); a hub id or a single file uses CLIP's, as SD's read."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
):
    """Scan a training folder as `sdtune train` would, without training: image counts, bucket histogram,
    caption sources, captions longer than the text encoder reads, and every file that would be skipped.
    Exits 2 when no image is usable."""
    from sdtune.config import load_config
    from sdtune.data.check import report
    from sdtune.data.scan import joined, no_usable_images, not_training_folders, scan_all, scan_subsets
    from sdtune.data.tokens import model_tokenizer
    from sdtune.run import TrainRequest

    request = TrainRequest(preset=preset, data=folder, model=model, sets=tuple(set_))
    cfg, _ = load_config(preset, request.overrides, dataset=request.dataset)
    folder = request.folder(cfg)
    with console.status(f"checking the images in {folder or 'the subsets'}"):
        exclude = not_training_folders(cfg.data)  # as train does
        subsets = scan_subsets(cfg.data, exclude) if folder is None else []
        scan = joined(subsets) if folder is None else scan_all(folder, cfg.data, exclude=exclude)
        try:
            tokenizer = model_tokenizer(cfg.model) if scan.examples else None
        except SdtuneError as exc:  # the folder is still worth its report
            tokenizer, unmeasured = None, str(exc)
    out = Console(highlight=False, soft_wrap=True)
    if tokenizer is None and scan.examples:
        out.print(f"note: caption lengths not measured: {escape(unmeasured)}")
    if folder is None:
        _print_subsets(out, subsets, cfg.data)
    _print_report(out, report(scan, cfg.data, tokenizer), folder, cfg.data)
    if not scan.examples:
        raise SdtuneError(no_usable_images(folder or Path(cfg.data.subsets[0].dir), scan))


def _print_subsets(out: Console, scans, data) -> None:
    """One line per data.subsets table: its folder, images, skips, repeats, class role, captions, a sample."""
    from sdtune.data.check import subset_reports

    for n, row in enumerate(subset_reports(scans, data), 1):
        s = row.subset
        skipped = (", skipped " + ", ".join(f"{k:,} {kind}" for kind, k in sorted(row.skipped.items()))
                   if row.skipped else "")
        role = ", is_reg (class images)" if s.is_reg else ""
        sources = ", ".join(f"{k:,} {source}" for source, k in row.captions) or "none"
        out.print(f"subset {n}: {escape(s.dir)}: {row.images:,} images{skipped}, x {s.repeats} repeats = "
                  f"{row.images * s.repeats:,}{role}; captions: {sources}")
        if row.sample:
            out.print(f"  e.g. {escape(row.sample[0])}: {escape(repr(row.sample[1]))}")


def _print_report(out: Console, rep, folder: Path | None, data) -> None:
    from rich.markup import escape
    from rich.table import Column, Table

    repeats = f", {rep.with_repeats:,} with repeats" if rep.with_repeats != rep.usable else ""
    where = escape(str(folder)) if folder else f"{len(data.subsets)} subsets"
    out.print(f"{rep.found:,} image{'' if rep.found == 1 else 's'} in {where}: {rep.usable:,} usable"
              + repeats)
    if rep.buckets:
        top = max(n for _, _, n in rep.buckets)
        table = Table(Column("bucket (w x h)", no_wrap=True), Column("images", justify="right"),
                      Column("with repeats", justify="right"), Column("", no_wrap=True), box=None,
                      title=f"buckets at data.resolution={data.resolution}"
                            + ("" if data.buckets else " (data.buckets=false: square crops)"), title_justify="left")
        for (w, h), images, weighted in rep.buckets:
            table.add_row(f"{w} x {h}", f"{images:,}", f"{weighted:,}", "#" * max(1, round(30 * weighted / top)))
        out.print(table, soft_wrap=False)
    if rep.captions:
        empty = f" ({rep.empty_captions:,} empty)" if rep.empty_captions else ""
        out.print("captions: " + ", ".join(f"{n:,} {source}" for source, n in rep.captions) + empty)
    if rep.cut is not None and rep.cut.count:
        out.print(f"[yellow]warning[/] {escape(rep.cut.line())} (measured with {escape(rep.tokenizer)})")
    elif rep.cut is not None:
        out.print(f"every caption fits the {rep.cut.limit} tokens the text encoder reads ({escape(rep.tokenizer)})")
    for skip in rep.skipped:
        where = skip.path.relative_to(folder) if folder and skip.path.is_relative_to(folder) else skip.path
        out.print(f"[yellow]skipped[/] {escape(str(where))} ({skip.kind}): {escape(skip.detail)}")
    for warning in rep.warnings:
        out.print(f"[yellow]warning[/] {escape(warning)}")
    for note in rep.notes:
        out.print(f"note: {escape(note)}")
    if rep.summary:
        out.print(rep.summary)
    elif rep.usable:
        out.print("no problems found")


if __name__ == "__main__":
    app()
