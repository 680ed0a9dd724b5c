"""The caption an image trains with is kohya's: `captions.render` against a transcription of sd-scripts'
`BaseDataset.process_caption` (library/train_util.py), seeded alike, on many captions and settings; and
where sdtune departs from it on purpose, that it draws the same numbers and differs only as said."""

from __future__ import annotations

import itertools
import random
import re
from types import SimpleNamespace

import pytest

from sdtune.config import DataConfig
from sdtune.data import captions
from sdtune.errors import SdtuneError


def kohya_process_caption(subset, caption):
    """sd-scripts library/train_util.py, BaseDataset.process_caption (HEAD 48d368f), as written there, draws
    from the module `random`; left out: caption_dropout_every_n_epochs and token_warmup_step (sdtune has
    neither: both 0 here) and the textual-inversion replacements (none)."""
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix

    is_drop_out = subset.caption_dropout_rate > 0 and random.random() < subset.caption_dropout_rate
    if is_drop_out:
        caption = ""
    else:
        if subset.enable_wildcard:
            if "\n" in caption:
                caption = random.choice(caption.split("\n"))
            replacer1 = "⦅"
            replacer2 = "⦆"
            while replacer1 in caption or replacer2 in caption:
                replacer1 += "⦅"
                replacer2 += "⦆"
            caption = caption.replace("{{", replacer1).replace("}}", replacer2)

            def replace_wildcard(match):
                return random.choice(match.group(1).split("|"))

            caption = re.sub(r"\{([^}]+)\}", replace_wildcard, caption)
            caption = caption.replace(replacer1, "{").replace(replacer2, "}")
        else:
            caption = caption.split("\n")[0]

        if subset.shuffle_caption or subset.caption_tag_dropout_rate > 0:
            fixed_tokens = []
            flex_tokens = []
            fixed_suffix_tokens = []
            if subset.keep_tokens_separator and subset.keep_tokens_separator in caption:
                fixed_part, flex_part = caption.split(subset.keep_tokens_separator, 1)
                if subset.keep_tokens_separator in flex_part:
                    flex_part, fixed_suffix_part = flex_part.split(subset.keep_tokens_separator, 1)
                    fixed_suffix_tokens = [t.strip() for t in fixed_suffix_part.split(subset.caption_separator)
                                           if t.strip()]
                fixed_tokens = [t.strip() for t in fixed_part.split(subset.caption_separator) if t.strip()]
                flex_tokens = [t.strip() for t in flex_part.split(subset.caption_separator) if t.strip()]
            else:
                tokens = [t.strip() for t in caption.strip().split(subset.caption_separator)]
                flex_tokens = tokens[:]
                if subset.keep_tokens > 0:
                    fixed_tokens = flex_tokens[: subset.keep_tokens]
                    flex_tokens = tokens[subset.keep_tokens :]

            def dropout_tags(tokens):
                if subset.caption_tag_dropout_rate <= 0:
                    return tokens
                out = []
                for token in tokens:
                    if random.random() >= subset.caption_tag_dropout_rate:
                        out.append(token)
                return out

            if subset.shuffle_caption:
                random.shuffle(flex_tokens)
            flex_tokens = dropout_tags(flex_tokens)
            caption = ", ".join(fixed_tokens + flex_tokens + fixed_suffix_tokens)

        if subset.secondary_separator:
            caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


def kohya(cfg: DataConfig, caption: str, seed: int) -> tuple[str, float]:
    """kohya's caption for sdtune's `cfg`, seeded, and the next number its generator would give."""
    subset = SimpleNamespace(
        caption_prefix=cfg.caption_prefix, caption_suffix=cfg.caption_suffix, caption_dropout_rate=cfg.caption_dropout,
        enable_wildcard=cfg.wildcards, shuffle_caption=cfg.shuffle_tags, caption_tag_dropout_rate=cfg.tag_dropout,
        keep_tokens_separator=cfg.keep_tags_separator, keep_tokens=cfg.keep_tags, caption_separator=",",
        secondary_separator=cfg.secondary_separator)
    state = random.getstate()
    try:
        random.seed(seed)
        return kohya_process_caption(subset, caption), random.random()
    finally:
        random.setstate(state)


def sdtune(cfg: DataConfig, caption: str, seed: int) -> tuple[str, float]:
    rng = random.Random(seed)
    return captions.render(caption, cfg, rng), rng.random()


TAGS = ["1girl", "sks dog", "red collar", "looking at viewer", "sky;;;cloud;;;day", "{simple|white} background",
        "{{retro style}}", "outdoors", "smile"]


def caption_set(rng: random.Random, lines: int) -> str:
    """Captions as taggers and people write them: tags, keep separators (a fixed head, sometimes a fixed
    tail), secondary separators, wildcards, escaped braces; one line or several."""
    out = []
    for _ in range(lines):
        tags = rng.sample(TAGS, rng.randint(1, len(TAGS)))
        i, j = sorted(rng.choices(range(len(tags) + 1), k=2))
        parts = {"plain": [tags], "head": [tags[:i], tags[i:]], "head and tail": [tags[:i], tags[i:j], tags[j:]]}
        out.append(" ||| ".join(", ".join(part) for part in parts[rng.choice(list(parts))]))
    return "\n".join(out)


SETTINGS = [dict(shuffle_tags=s, keep_tags=k, tag_dropout=t, caption_dropout=d, keep_tags_separator=sep,
                 secondary_separator=sec, wildcards=w)
            for s, k, t, d, sep, sec, w in itertools.product((False, True), (0, 2), (0.0, 0.3), (0.0, 0.2),
                                                             ("", "|||"), ("", ";;;"), (False, True))]


def same_as_kohya(cfg: DataConfig, caption: str) -> bool:
    """Whether sdtune departs from kohya here on purpose (see `render`): a prefix or suffix on a caption of
    several lines, empty tags, or a keep separator left in a caption nothing shuffles or drops."""
    affixed_lines = "\n" in caption and (cfg.caption_prefix or cfg.caption_suffix)
    text = f"{cfg.caption_prefix} {caption} {cfg.caption_suffix}"
    random_tags = cfg.shuffle_tags or cfg.tag_dropout
    separator_kept = cfg.keep_tags_separator and cfg.keep_tags_separator in text and not random_tags
    return not (affixed_lines or separator_kept)


def test_render_is_kohyas_process_caption_for_many_captions_settings_and_seeds():
    rng, compared = random.Random(29), 0
    for settings in SETTINGS:
        for affix in (("", ""), ("masterpiece", "anime screencap"), ("1girl, hatsune miku |||", ", best ||| end")):
            cfg = DataConfig(**settings, caption_prefix=affix[0], caption_suffix=affix[1])
            for _ in range(6):
                caption = caption_set(rng, rng.choice((1, 1, 3)))
                if not same_as_kohya(cfg, caption):
                    continue
                for seed in range(4):
                    assert sdtune(cfg, caption, seed) == kohya(cfg, caption, seed), (settings, affix, caption, seed)
                    compared += 1
    assert compared > 2000, compared  # the filter leaves most cases compared


def test_the_documented_examples_of_sd_scripts_come_out_as_its_docs_say():
    # docs/config_README-en.md: keep_tokens_separator, secondary_separator, wildcard notation
    cfg = DataConfig(shuffle_tags=True, keep_tags_separator="|||")
    caption = ("1girl, hatsune miku, vocaloid ||| stage, microphone, white shirt, smile ||| best quality, "
               "rating: general")
    outs = {captions.render(caption, cfg, random.Random(seed)) for seed in range(40)}
    assert len(outs) > 10
    for out in outs:
        tags = out.split(", ")
        assert tags[:3] == ["1girl", "hatsune miku", "vocaloid"] and tags[-2:] == ["best quality", "rating: general"]
        assert sorted(tags[3:-2]) == ["microphone", "smile", "stage", "white shirt"]
    cfg = DataConfig(secondary_separator=";;;", shuffle_tags=True, tag_dropout=0.5)
    outs = [captions.render("1girl, sky;;;cloud;;;day, outdoors", cfg, random.Random(s)) for s in range(40)]
    assert all("sky,cloud,day" in out or "cloud" not in out for out in outs)  # one tag: kept or dropped whole
    assert any("sky,cloud,day" in out for out in outs) and any("cloud" not in out for out in outs)
    cfg = DataConfig(wildcards=True)
    outs = {captions.render("1girl, {simple|white} background, {{retro style}}", cfg, random.Random(s))
            for s in range(20)}
    assert outs == {"1girl, simple background, {retro style}", "1girl, white background, {retro style}"}


def test_tag_dropout_drops_each_flexible_tag_at_its_rate_and_never_the_kept_ones():
    cfg = DataConfig(tag_dropout=0.25, keep_tags=1)
    caption = "sks dog, " + ", ".join(f"t{i}" for i in range(20))
    outs = [captions.render(caption, cfg, random.Random(seed)).split(", ") for seed in range(200)]
    assert all(out[0] == "sks dog" for out in outs)
    kept = sum(len(out) - 1 for out in outs) / (20 * 200)
    assert 0.72 < kept < 0.78
    assert all(out[1:] == sorted(out[1:], key=lambda t: int(t[1:])) for out in outs)  # no shuffle asked: in order
    with pytest.raises(SdtuneError, match=r"data.tag_dropout must be in \[0, 1\)"):
        DataConfig(tag_dropout=1.0)


def test_where_sdtune_departs_from_kohya_it_draws_the_same_numbers():
    lines = "sks dog, grass\na photo of sks dog\nsks dog on a {red|blue} rug"
    cfg = DataConfig(wildcards=True, caption_prefix="masterpiece", caption_suffix="4k")
    theirs_all = []
    for seed in range(20):  # every line gets the prefix and suffix; kohya's first line the prefix, its last the suffix
        ours, after = sdtune(cfg, lines, seed)
        theirs, their_after = kohya(cfg, lines, seed)
        bare = theirs.removeprefix("masterpiece ").removesuffix(" 4k")
        assert after == their_after and ours == f"masterpiece {bare} 4k"
        theirs_all.append(theirs)
    assert {t.startswith("masterpiece") for t in theirs_all} == {True, False}
    cfg = DataConfig(shuffle_tags=True, tag_dropout=0.2)
    for seed in range(20):  # kohya writes an empty tag as ", ,"; sdtune leaves it out
        ours, after = sdtune(cfg, "a, b,, c, d, ", seed)
        theirs, their_after = kohya(cfg, "a, b,, c, d, ", seed)
        assert after == their_after and ours == ", ".join(t for t in theirs.split(", ") if t)
    cfg = DataConfig(keep_tags_separator="|||")  # nothing shuffles or drops: kohya leaves "|||" in the text
    assert captions.render("sks dog ||| grass, sky", cfg, random.Random(0)) == "sks dog, grass, sky"


def test_fixed_is_the_deterministic_part_for_the_text_cache_and_validation():
    cfg = DataConfig(caption_prefix="photo of", caption_suffix=", 4k", secondary_separator=";", caption_dropout=0.5,
                     shuffle_tags=True, tag_dropout=0.5, wildcards=True, keep_tags_separator="|||")
    caption = "sks dog ||| {red|blue} rug, sky;cloud, grass\nsecond line"
    assert captions.fixed(caption, cfg) == "photo of sks dog, red rug, sky,cloud, grass, 4k"
    plain = DataConfig(caption_prefix="sks", caption_suffix="style")
    assert captions.fixed("a dog\nother", plain) == "sks a dog style"  # first line, the suffix on it
    for seed in range(10):  # with no randomness asked for, what trains is what is cached
        assert captions.render("a dog", plain, random.Random(seed)) == captions.fixed("a dog", plain)


def test_with_wildcards_a_caption_files_lines_are_alternatives_and_not_warned_about(tmp_path):
    from PIL import Image

    from sdtune.data import BatchStream, scan_folder

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("sks dog, grass\n\na photo of sks dog\n  sks dog on a {red|blue} rug \n")
    plain = scan_folder(tmp_path, DataConfig(resolution=64))
    assert plain.examples[0].caption == "sks dog, grass" and any("more than one line" in w for w in plain.warnings)
    cfg = DataConfig(resolution=64, wildcards=True, caption_prefix="photo,")
    scan = scan_folder(tmp_path, cfg)
    assert scan.examples[0].caption == "sks dog, grass\na photo of sks dog\nsks dog on a {red|blue} rug"
    assert not any("more than one line" in w for w in scan.warnings)
    stream = BatchStream(scan.examples, cfg, 1, seed=0)
    assert {stream.items(k)[0].caption for k in range(40)} == {"photo, sks dog, grass", "photo, a photo of sks dog",
                                                               "photo, sks dog on a red rug",
                                                               "photo, sks dog on a blue rug"}


def test_validation_reads_the_prefix_and_suffix_and_nothing_random(tmp_path):
    from PIL import Image

    from sdtune.data import scan_folder
    from sdtune.train.validation import Validation

    for name in ("a", "b"):
        Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"{name} dog, {{red|blue}} rug, grass, sky\nother line")
    data = DataConfig(resolution=64, caption_prefix="sks", caption_suffix="style", wildcards=True, shuffle_tags=True,
                      tag_dropout=0.5, caption_dropout=0.5)
    examples = scan_folder(tmp_path, data).examples
    validation = Validation(examples, SimpleNamespace(data=data, train=SimpleNamespace(batch_size=2, seed=0)))
    for _ in range(2):
        batches = validation.batches()
        assert [item.caption for item in batches[0]] == ["sks a dog, red rug, grass, sky style",
                                                         "sks b dog, red rug, grass, sky style"]


def test_the_text_cache_holds_the_captions_with_prefix_and_suffix(tiny_sd1, images, tmp_path, monkeypatch):
    from support.helpers import prepared
    from transformers import CLIPTextModel

    from sdtune.data.cache import key_of
    from sdtune.train import loop as trainer

    sets = ["train.max_steps=2", f"data.cache_dir={tmp_path / 'cache'}", "data.caption_prefix=sks",
            "data.caption_suffix=style", "data.caption_dropout=0.3"]
    plain = prepared(tiny_sd1, images, tmp_path / "plain", *sets)
    trainer.loop(plain)
    cached = prepared(tiny_sd1, images, tmp_path / "cached", *sets, "data.cache_text=true")
    cache = cached.features.text_cache
    assert all(cache.get(key_of(f"sks {e.caption} style")) is not None for e in cached.stream.examples)
    assert cache.get(key_of("")) is not None  # caption dropout's empty caption
    embeds = []
    monkeypatch.setattr(CLIPTextModel, "forward", lambda *a, **k: embeds.append(1))  # the loop must not embed
    trainer.loop(cached)
    assert embeds == [] and cached.losses == pytest.approx(plain.losses, rel=1e-4)


def test_a_held_out_image_of_a_subset_is_validated_with_its_subsets_prefix_and_suffix(tmp_path):
    # review of issue 29: validation read the captions with [data]'s settings alone, so a subset's
    # caption_prefix (a kohya trigger word) trained but was never in the validation captions
    from PIL import Image

    from sdtune.config import SubsetConfig
    from sdtune.data.scan import joined, scan_subsets
    from sdtune.train.validation import Validation

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (64, 64), (200, 30, 30 * i)).save(tmp_path / name / f"{i}.png")
    subsets = (SubsetConfig(dir=str(tmp_path / "a"), caption="dog", caption_prefix="sks"),
               SubsetConfig(dir=str(tmp_path / "b"), caption="cat", caption_suffix="style", shuffle_tags=True))
    data = DataConfig(resolution=64, subsets=subsets, validation_split=0.5)
    examples = joined(scan_subsets(data)).examples
    validation = Validation(examples, SimpleNamespace(data=data, train=SimpleNamespace(batch_size=4, seed=0)))
    assert sorted(item.caption for item in validation.batches()[0]) == ["cat style", "cat style", "sks dog",
                                                                        "sks dog"]
