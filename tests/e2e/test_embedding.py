"""Textual inversion (`train.method = "embedding"`) on the tiny SD 1.x and SDXL models: only the new word's
vectors train, its file loads with diffusers' own `load_textual_inversion` and changes only that word's
encoding, a resumed run equals the straight one, `sdtune sample --embedding` draws with it, and the
estimator counts it."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from support.helpers import prepared, runner, said, train

from sdtune.cli import app
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.family.base import TEXT_ENCODER_NAMES
from sdtune.train import loop as trainer

EMBEDDING = ("train.method=embedding", "embedding.token=<sks>", "embedding.vectors=2", "embedding.init_text=square",
             "train.learning_rate=1e-2")
SETS = tuple(arg for item in EMBEDDING for arg in ("--set", item))
CAPTION = "a <sks> red circle on the white background"


@pytest.fixture(scope="module")
def token_images(images, tmp_path_factory):
    """The shared images, each caption naming the new word: "a <sks> blue square on the white background"."""
    folder = tmp_path_factory.mktemp("token") / "images"
    shutil.copytree(images, folder)
    for caption in folder.glob("*.txt"):
        caption.write_text(caption.read_text().replace("a ", "a <sks> ", 1))
    return folder


def test_a_multi_vector_word_is_spelled_out_as_diffusers_spells_it():
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    from sdtune.family.clip_tokenizer import clip_tokenizer, spelled_out

    tokenizer = clip_tokenizer()
    assert spelled_out(tokenizer, "a <sks> dog") == "a <sks> dog"  # a tokenizer without one: unchanged
    tokenizer.add_tokens(["<sks>", "<sks>_1", "<sks>_2", "<one>"])
    for caption in ("a <sks> dog", "<sks>, <one> and <sks>", "a dog"):
        expected = TextualInversionLoaderMixin._maybe_convert_prompt(None, caption, tokenizer)
        assert spelled_out(tokenizer, caption) == expected
    assert spelled_out(tokenizer, "a <sks> dog") == "a <sks> <sks>_1 <sks>_2 dog"


def _fresh(model):
    from sdtune.family.load import load_components

    return load_components(str(model))


def _base_weights(components) -> dict:
    parts = {"unet": components.unet, **dict(zip(TEXT_ENCODER_NAMES, components.text_encoders, strict=False))}
    return {f"{part}.{key}": value for part, module in parts.items() for key, value in module.state_dict().items()}


def _trained_weights(run) -> dict:
    """Every weight of the run's UNet and text encoders but the new vectors, named as in the base model."""
    weights = _base_weights(run.components)
    return {key.replace(".token_embedding.table.", ".token_embedding."): value for key, value in weights.items()
            if ".token_embedding.new." not in key}


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sdxl"])
def test_only_the_new_vectors_train_and_the_file_loads_in_diffusers(fixture, token_images, tmp_path, request):
    from diffusers.utils import logging as diffusers_logging

    from sdtune.export.run_output import export_run
    from sdtune.family.load import assemble_pipeline

    model = request.getfixturevalue(fixture)
    run = prepared(model, token_images, tmp_path / "out", *EMBEDDING, "train.max_steps=3")
    start = {name: vectors.detach().clone() for name, vectors in run.placement.weights().items()}
    trainer.loop(run)
    base, fresh = _base_weights(_fresh(model)), _fresh(model)
    trained = _trained_weights(run)
    assert trained.keys() == base.keys() and all(torch.equal(trained[k], base[k]) for k in base)
    vectors = {name: v.detach().clone() for name, v in run.placement.weights().items()}
    assert list(vectors) == list(TEXT_ENCODER_NAMES[:len(fresh.text_encoders)])  # both of SDXL's encoders
    ids = fresh.tokenizers[0]("square", add_special_tokens=False).input_ids
    first_table = fresh.text_encoders[0].get_input_embeddings().weight
    assert torch.equal(start["text_encoder"], first_table[[ids[0], ids[1 % len(ids)]]])  # init_text, to 2 vectors
    assert all(v.dtype == torch.float32 and v.shape[0] == 2 and not torch.equal(v, start[n])
               for n, v in vectors.items())
    ours = run.components.family.encode(run.components, [CAPTION]).hidden
    during = assemble_pipeline(run.components).encode_prompt(CAPTION, device="cpu", num_images_per_prompt=1,
                                                             do_classifier_free_guidance=False)[0]
    assert torch.equal(during, ours)  # the samples during training draw with the vectors being trained
    export_run(run, "cpu")

    path = tmp_path / "out" / "embedding.safetensors"
    with safe_open(str(path), framework="pt") as file:
        keys, metadata = {k: file.get_slice(k).get_shape() for k in file.keys()}, file.metadata()
    widths = [e.config.hidden_size for e in fresh.text_encoders]
    expected = {"emb_params": [2, widths[0]]} if fixture == "tiny_sd1" else {"clip_l": [2, 32], "clip_g": [2, 48]}
    assert keys == expected
    assert (metadata["modelspec.trigger_phrase"], metadata["sdtune.vectors"], metadata["ss_steps"]) == (
        "<sks>", "2", "3")
    pipe = assemble_pipeline(fresh)

    def encoded(prompt):
        return pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]

    before = encoded("a red circle")
    diffusers_logging.set_verbosity_error()
    if fixture == "tiny_sd1":  # as diffusers' docs load each kind of file
        pipe.load_textual_inversion(str(path), token="<sks>")
    else:
        state = load_file(path)
        pipe.load_textual_inversion(state["clip_g"], token="<sks>", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        pipe.load_textual_inversion(state["clip_l"], token="<sks>", text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
    for name, tokenizer, encoder in zip(TEXT_ENCODER_NAMES, fresh.tokenizers, fresh.text_encoders, strict=False):
        ids = tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids], vectors[name])
    assert torch.equal(encoded("a red circle"), before)  # a prompt without the word encodes as the base model's
    theirs = encoded(CAPTION)
    assert not torch.equal(theirs, before)
    assert torch.allclose(theirs, ours, atol=1e-6)  # training read the caption as the pipeline reads the prompt


def test_with_ema_the_file_holds_the_moving_average(tiny_sd1, token_images, tmp_path):
    from sdtune.export.run_output import export_run

    run = prepared(tiny_sd1, token_images, tmp_path / "out", *EMBEDDING, "train.max_steps=2", "train.ema_decay=0.5")
    trainer.loop(run)
    [average] = run.ema.weights().values()  # the one trained parameter: the vectors of the one text encoder
    assert not torch.equal(average, run.placement.weights()["text_encoder"])
    export_run(run, "cpu")
    assert torch.equal(load_file(tmp_path / "out" / "embedding.safetensors")["emb_params"], average.cpu())


def test_a_word_the_tokenizer_knows_and_the_rules_are_one_line(tiny_sd1, token_images, tmp_path):
    with pytest.raises(SdtuneError, match=r"^embedding.token='square': the tokenizer already knows 'square'"):
        prepared(tiny_sd1, token_images, tmp_path / "o", "train.method=embedding", "embedding.token=square")
    with pytest.raises(SdtuneError, match="^train.method=embedding trains a new word's embedding; embedding.token "
                                          "is empty"):
        load_config("cpu", ["train.method=embedding"])
    with pytest.raises(SdtuneError, match="data.cache_text cannot serve it: set data.cache_text=false"):
        load_config("lora-4gb", ["train.method=embedding", "embedding.token=<sks>", "data.cache_text=true"])
    for bad, text in (("embedding.vectors=76", "must be 1-75"), ("embedding.token=<SKS>", "use '<sks>'"),
                      ("embedding.token=a b", "must be one word")):
        with pytest.raises(SdtuneError, match=text):
            load_config("cpu", ["train.method=embedding", "embedding.token=<sks>", bad])


def test_an_empty_init_text_starts_from_the_mean_and_says_so(tiny_sd1, token_images, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="sdtune")
    run = prepared(tiny_sd1, token_images, tmp_path / "o", "train.method=embedding", "embedding.token=<sks>")
    table = _fresh(tiny_sd1).text_encoders[0].get_input_embeddings().weight
    assert torch.equal(run.placement.weights()["text_encoder"], table.mean(0, keepdim=True))
    assert ("embedding.init_text is empty: the 1 vector of <sks> start as the mean of every token's embedding"
            in said(caplog))


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sdxl"])
def test_a_resumed_run_equals_the_straight_one(fixture, token_images, tmp_path, request):
    model = request.getfixturevalue(fixture)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ("--max-steps", "4", "--set", "output.checkpoint_every=2", "--set", "output.keep_checkpoints=4", *SETS)
    expected = train(model, token_images, straight, *args)
    shutil.copytree(straight, killed)
    for step in (3, 4):
        shutil.rmtree(killed / "checkpoints" / f"step-{step:06d}", ignore_errors=True)
    (killed / "summary.json").unlink()
    (killed / "embedding.safetensors").unlink()
    resumed = train(model, token_images, killed, *args, "--resume")
    assert resumed["losses"] == expected["losses"]
    a, b = load_file(straight / "embedding.safetensors"), load_file(killed / "embedding.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = load_file(straight / "checkpoints" / "step-000004" / "embedding.safetensors")
    assert sorted(saved) == list(TEXT_ENCODER_NAMES[:len(a)])  # the checkpoint holds the vectors and nothing else


def test_sample_draws_with_the_run_folder_or_the_file(tiny_sd1, token_images, tmp_path):
    out = tmp_path / "run"
    train(tiny_sd1, token_images, out, "--max-steps", "2", *SETS)
    common = ["--prompt", "a photo of <x> circle", "--num-images", "1", "--steps", "2"]
    drawn = {}
    for name, args in (("folder", ["--ckpt", str(out)]),
                       ("file", ["--ckpt", str(tiny_sd1), "--embedding", str(out / "embedding.safetensors")]),
                       ("base", ["--ckpt", str(tiny_sd1)])):
        prompt = common if name != "base" else ["--prompt", "a photo of circle", *common[2:]]
        folder = tmp_path / name
        result = runner.invoke(app, ["sample", *args, *prompt, "--out", str(folder)]
                               + (["--embedding-token", "<x>"] if name == "file" else []))
        assert result.exit_code == 0, result.output
        drawn[name] = (folder / "000-seed0.png").read_bytes()
    assert drawn["file"] != drawn["base"]
    result = runner.invoke(app, ["sample", "--ckpt", str(out), "--prompt", "a photo of <sks> circle", "--num-images",
                                 "1", "--steps", "2", "--out", str(tmp_path / "own")])
    assert result.exit_code == 0, result.output  # the folder's own word, from the file's metadata
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "embedding" and summary["embedding_file"] == "embedding.safetensors"


def test_an_embedding_of_another_family_is_one_line(tiny_sd1, tiny_sdxl, token_images, tmp_path):
    out = tmp_path / "run"
    train(tiny_sd1, token_images, out, "--max-steps", "1", *SETS)
    result = runner.invoke(app, ["sample", "--ckpt", str(tiny_sdxl), "--embedding", str(out / "embedding.safetensors"),
                                 "--prompt", "a <sks>", "--num-images", "1", "--steps", "1",
                                 "--out", str(tmp_path / "s")])
    assert result.exit_code != 0
    assert "holds emb_params, where a sdxl model's embedding holds clip_l and clip_g" in " ".join(result.output.split())


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sdxl"])
def test_the_estimate_counts_the_new_vectors_and_the_text_encoders_exactly(fixture, request):
    """fp32 vectors (weights, their gradients at the end of backward, fused AdamW's 8 bytes a value and a step
    count each), and everything else frozen in fp16, the text encoders included: the bytes of what
    `sdtune.train.placement` really places."""
    from sdtune.estimate import estimate
    from sdtune.plan import make_plan
    from sdtune.train.placement import place

    model = str(request.getfixturevalue(fixture))
    cfg, info = load_config("rtx2070", [f"model.pretrained={model}", "memory.device=cpu", "data.resolution=64",
                                        "train.batch_size=1", "memory.optimizer_offload=none", "data.cache_text=false",
                                        *EMBEDDING])
    components = _fresh(model)
    placed = place(components, make_plan(cfg.memory, "cpu", "sdpa"), cfg)
    placed.close()
    trained = list(placed.weights().values())
    numel = 2 * sum(encoder.config.hidden_size for encoder in components.text_encoders)
    assert sum(p.numel() for p in trained) == numel and {p.dtype for p in trained} == {torch.float32}
    guess = estimate(cfg, info, model, device="cpu")
    assert guess.categories["weights"] == 4 * numel
    assert guess.milestones["backward_end"]["gradients"] == 4 * numel
    assert guess.categories["optimizer_state"] == sum(8 * p.numel() + 4 for p in trained)
    frozen = [p for m in (components.unet, *components.frozen) for p in m.parameters() if not p.requires_grad]
    assert guess.categories["frozen"] == sum(p.numel() * p.element_size() for p in frozen)
    assert {p.dtype for m in (components.unet, *components.text_encoders) for p in m.parameters()
            if not p.requires_grad} == {torch.float16}
    lora = estimate(*load_config("rtx2070", [f"model.pretrained={model}", "memory.device=cpu", "data.resolution=64",
                                             "train.batch_size=1", "memory.optimizer_offload=none",
                                             "data.cache_text=false", "train.method=lora"]), model, device="cpu")
    held, lora_held = (e.milestones["forward_end"]["activations"] for e in (guess, lora))
    assert held > lora_held  # what the text encoders keep for their backward


def test_auto_and_the_presets_train_an_embedding_on_the_lora_plans():
    from sdtune.estimate import auto, estimate
    from sdtune.estimate import fallback as replan

    gib, overrides = 2**30, ["train.method=embedding", "embedding.token=<sks>"]
    labels = [c.label for c, _, _ in auto.ordered(auto.Gpu("Ampere", 6 * gib, bf16=True), overrides)]
    assert labels[:2] == ["lora-6gb + memory.precision=bf16", "lora-4gb + memory.precision=bf16"]
    assert [c.label for c, _, _ in auto.ordered(auto.Gpu("XL", 8 * gib, bf16=True), overrides, "sdxl")][0] == (
        "sdxl-lora-8gb")
    cfg, info = load_config("lora-4gb", overrides)  # its text cache gives way to the method
    assert not cfg.data.cache_text
    result = estimate(cfg, info)
    assert result.total <= auto.SAFETY * info.vram_gib * gib and result.categories["optimizer_state"] < 2**20
    assert replan.next_smaller(cfg, info).overrides == ("memory.param_offload=cpu",)
    result = runner.invoke(app, ["estimate-vram", "--preset", "all", "--json", *(a for o in overrides for a in
                                                                                 ("--set", o))])
    assert result.exit_code == 0, result.output
    estimates = json.loads(result.output)["estimates"]
    assert [e["preset"] for e in estimates] == ["lora-4gb", "lora-6gb"]
