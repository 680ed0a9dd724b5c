"""kohya sd-scripts' dataset config as `--data dataset.toml`, and sdtune's own `[[data.subsets]]`.

The anchor is sd-scripts: `library/config_util.py` (the key schemas, `generate_params_by_fallbacks`),
`library/train_util.py` (FineTuningDataset's caption) and `docs/config_README-en.md` (the example config),
transcribed below where a test compares with them.
"""

import json
import logging

import pytest
import tomllib
from support.helpers import said
from support.kohya_example import README_EXAMPLE, dreambooth_part
from support.testing import make_image_folder

from sdtune.config import Config, DataConfig, SubsetConfig, apply_layers, load_config
from sdtune.config.dataset_toml import FATES, dataset_sets, translate
from sdtune.config.toml import from_toml, to_toml
from sdtune.data.scan import kohya_metadata_caption, scan_subsets
from sdtune.data.stream import BatchStream
from sdtune.errors import SdtuneError

# config_util.py's ConfigSanitizer schemas: every key a dataset config may hold
KOHYA_KEYS = {
    "SUBSET_ASCENDABLE_SCHEMA": ["color_aug", "face_crop_aug_range", "flip_aug", "num_repeats", "random_crop",
                                 "shuffle_caption", "keep_tokens", "keep_tokens_separator", "secondary_separator",
                                 "caption_separator", "enable_wildcard", "token_warmup_min", "token_warmup_step",
                                 "caption_prefix", "caption_suffix", "custom_attributes", "resize_interpolation"],
    "DO_SUBSET_ASCENDABLE_SCHEMA": ["caption_dropout_every_n_epochs", "caption_dropout_rate",
                                    "caption_tag_dropout_rate"],
    "DB_SUBSET_ASCENDABLE_SCHEMA": ["caption_extension", "class_tokens", "cache_info"],
    "DB_SUBSET_DISTINCT_SCHEMA": ["image_dir", "is_reg", "alpha_mask"],
    "FT_SUBSET_DISTINCT_SCHEMA": ["metadata_file", "image_dir", "alpha_mask"],
    "CN_SUBSET_DISTINCT_SCHEMA": ["image_dir", "conditioning_data_dir"],
    "DATASET_ASCENDABLE_SCHEMA": ["batch_size", "bucket_no_upscale", "bucket_reso_steps", "enable_bucket",
                                  "max_bucket_reso", "min_bucket_reso", "validation_seed", "validation_split",
                                  "resolution", "network_multiplier", "resize_interpolation"],
    "ARGPARSE_SPECIFIC_SCHEMA": ["debug_dataset", "max_token_length", "prior_loss_weight"],
}


def kohya_fallbacks(name, fallbacks, default=None):
    """config_util.py, BlueprintGenerator.search_value: the first level (subset, dataset, general) that has it."""
    for cand in fallbacks:
        value = cand.get(name)
        if value is not None:
            return value
    return default


@pytest.fixture
def folders(tmp_path):
    for name in ("hoge", "fuga", "reg", "piyo"):
        (tmp_path / name).mkdir()
    (tmp_path / "piyo" / "piyo_md.json").write_text("{}")
    return tmp_path


def readme(root, fine_tuning=True) -> dict:
    if not fine_tuning:
        return tomllib.loads(dreambooth_part(root.as_posix()))
    return tomllib.loads(README_EXAMPLE.format(root=root.as_posix()))


def test_every_key_of_kohyas_schemas_has_one_fate():
    assert {key for keys in KOHYA_KEYS.values() for key in keys} <= set(FATES)
    honoured = {key for key, fate in FATES.items() if fate.key}
    assert {"image_dir", "num_repeats", "is_reg", "class_tokens", "caption_extension", "shuffle_caption",
            "keep_tokens", "keep_tokens_separator", "caption_dropout_rate", "caption_tag_dropout_rate",
            "caption_prefix", "caption_suffix", "flip_aug", "random_crop", "metadata_file", "resolution",
            "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso"} <= honoured


def test_the_readme_example_inherits_as_sd_scripts_does(folders):
    raw = readme(folders, fine_tuning=False)
    layer = translate(raw, "dataset.toml", warned := {})
    assert warned == {}
    general, dataset = raw["general"], raw["datasets"][0]
    for subset, table in zip(dataset["subsets"], layer["data"]["subsets"], strict=True):
        fallbacks = [subset, dataset, general]
        assert table["keep_tags"] == kohya_fallbacks("keep_tokens", fallbacks, 0)
        assert table["shuffle_tags"] == kohya_fallbacks("shuffle_caption", fallbacks, False)
        assert table["caption_extension"] == kohya_fallbacks("caption_extension", fallbacks, ".caption")
        assert table["caption"] == subset["class_tokens"]
        assert table.get("is_reg", False) == subset.get("is_reg", False)
    assert [t["keep_tags"] for t in layer["data"]["subsets"]] == [2, 3, 1]  # as the README's comments say
    # kohya's dataset defaults: no buckets unless enable_bucket; the batch size is the dataset's
    assert layer["data"]["resolution"] == 512 and layer["data"]["buckets"] is False
    assert layer["train"] == {"batch_size": 4}
    path = folders / "dataset.toml"
    path.write_text(dreambooth_part(folders.as_posix()))
    assert dataset_sets(path) == ["data.buckets=false", "data.resolution=512", "train.batch_size=4"]  # --preset auto


def test_two_datasets_of_different_resolutions_are_one_error_line(folders):
    with pytest.raises(SdtuneError, match=r"^the datasets of d.toml differ in resolution \(512, 768\)") as error:
        translate(readme(folders), "d.toml", {})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("extra, key", [
    ("color_aug = true", "color_aug"), ("bucket_no_upscale = true", "bucket_no_upscale"),
    ("bucket_reso_steps = 32", "bucket_reso_steps"), ("token_warmup_step = 0.5", "token_warmup_step"),
    ("caption_dropout_every_n_epochs = 2", "caption_dropout_every_n_epochs"), ("cache_info = true", "cache_info"),
    ("face_crop_aug_range = [2.0, 4.0]", "face_crop_aug_range"), ("captoin_prefix = 'x'", "captoin_prefix"),
])
def test_a_key_sdtune_does_not_honour_is_one_warning_naming_it(folders, extra, key, caplog):
    caplog.set_level(logging.INFO, logger="sdtune")
    path = folders / "d.toml"
    path.write_text(f"[general]\n{extra}\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{folders.as_posix()}/hoge'\n"
                    f"[[datasets.subsets]]\nimage_dir = '{folders.as_posix()}/fuga'\n")
    load_config("cpu", dataset=path)
    lines = [line for line in said(caplog) if line.startswith("warning: ")]
    assert len(lines) == 1 and key in lines[0], lines


def test_a_key_outside_general_and_datasets_is_said_not_read(folders):
    raw = {"resolution": 768, "datasets": [{"subsets": [{"image_dir": str(folders / "hoge")}]}]}
    layer = translate(raw, "d.toml", warned := {})
    assert "resolution" not in layer["data"] and "put it in [general]" in warned["resolution"]


def test_kohyas_harmless_defaults_warn_nothing(folders):
    raw = {"general": {"color_aug": False, "bucket_reso_steps": 64, "caption_separator": ",", "token_warmup_min": 1},
           "datasets": [{"subsets": [{"image_dir": str(folders / "hoge")}]}]}
    translate(raw, "d.toml", warned := {})
    assert warned == {}


@pytest.mark.parametrize("general, subset, message", [
    ({}, {"conditioning_data_dir": "c"}, r"conditioning_data_dir c \(the masks\) .* is not a folder"),
    ({"resolution": [768, 512]}, {}, r"resolution = \[768, 512\] .* no square of a multiple of 8"),
    ({"image_dir": "x"}, {}, "image_dir in .*belongs to each"),
    # a dataset's key in a subset: sd-scripts' subset schema refuses it; it was silently lost (review, issue 29)
    ({}, {"resolution": 1024}, r"resolution in \[\[datasets.subsets\]\] 1 .* belongs to its \[\[datasets\]\]"),
    ({"enable_bucket": "false"}, {}, "enable_bucket in d.toml must be true or false, got 'false'"),  # was: buckets
    ({}, {"batch_size": 3}, r"batch_size in \[\[datasets.subsets\]\] 1 .* belongs to its \[\[datasets\]\]"),
    ({}, {"image_dir": "nowhere"}, r"image_dir nowhere .* is not a folder \(relative to the current folder"),
])
def test_what_cannot_be_honoured_safely_is_one_error_line(folders, general, subset, message):
    raw = {"general": general, "datasets": [{"subsets": [{"image_dir": str(folders / "hoge"), **subset}]}]}
    with pytest.raises(SdtuneError, match=message) as error:
        translate(raw, "d.toml", {})
    assert "\n" not in str(error.value)


def test_a_non_square_resolution_of_a_square_area_is_that_square(folders):
    raw = {"general": {"resolution": [1024, 256], "enable_bucket": True, "min_bucket_reso": 128},
           "datasets": [{"subsets": [{"image_dir": str(folders / "hoge"), "random_crop": True, "flip_aug": True,
                                      "num_repeats": 10, "caption_tag_dropout_rate": 0.1}]}]}
    layer = translate(raw, "d.toml", {})
    assert layer["data"] == {"buckets": True, "resolution": 512, "min_side": 128, "subsets": [
        {"dir": str(folders / "hoge"), "center_crop": False, "random_flip": True, "repeats": 10, "tag_dropout": 0.1}]}


# ---------------------------------------------------------------------------------------------------------
# [[data.subsets]] in sdtune's own config


def test_subsets_round_trip_through_the_run_folders_config_toml():
    cfg = apply_layers(Config(), [({"data": {"subsets": [{"dir": "a", "repeats": 3, "caption": "sks dog"},
                                                         {"dir": "r", "is_reg": True, "random_flip": True}]}}, "t")])
    text = to_toml(cfg)
    assert text.count("[[data.subsets]]") == 2
    assert from_toml(text, "config.toml") == cfg
    assert cfg.data.for_subset(1).random_flip and not cfg.data.for_subset(0).random_flip
    assert cfg.data.for_subset(0).caption == "sks dog" and cfg.prior_preservation
    assert from_toml(to_toml(Config()), "config.toml") == Config()  # no subsets: a --data folder run


@pytest.mark.parametrize("table, message", [
    ({"dir": "a", "repets": 2}, "unknown key 'repets' in table 1 of data.subsets.*did you mean 'repeats'"),
    ({"dir": "a", "caption_dropout": 1.5}, r"^\[\[data.subsets\]\] 1 \(a\): data.caption_dropout must be in \[0, 1\)"),
    ({"repeats": 2}, "needs dir"),
])
def test_a_bad_subset_table_is_one_error_line(table, message):
    with pytest.raises(SdtuneError, match=message):
        apply_layers(Config(), [({"data": {"subsets": [table]}}, "t")])


def kohya_fine_tuning_caption(img_md, caption_separator=","):
    """train_util.py, FineTuningDataset.__init__, without enable_wildcard: the caption, then the tags."""
    caption = img_md.get("caption")
    tags = img_md.get("tags")
    if caption is None:
        caption = ""
    if tags is not None and len(tags) > 0:
        if len(caption) > 0:
            caption = caption + caption_separator
        caption = caption + tags
    return caption


def test_a_metadata_file_captions_the_images_it_lists_and_only_those(tmp_path):
    folder = make_image_folder(tmp_path / "piyo", count=3, captions=False)
    entries = {"img000": {"caption": "a girl", "tags": "1girl, smile"}, "img001.png": {"tags": "outdoors"}}
    (tmp_path / "md.json").write_text(json.dumps(entries))
    cfg = DataConfig(resolution=64, scan_cache=False,
                     subsets=(SubsetConfig(dir=str(folder), metadata_file=str(tmp_path / "md.json"), repeats=2),))
    scan, = scan_subsets(cfg)
    assert [e.caption for e in scan.examples] == [kohya_fine_tuning_caption(md) for md in entries.values()]
    assert [e.caption for e in scan.examples] == [kohya_metadata_caption(md) for md in entries.values()]
    assert {e.repeats for e in scan.examples} == {2} and {e.caption_source for e in scan.examples} == {"metadata"}
    assert [(s.path.name, s.kind) for s in scan.skipped] == [("img002.png", "not in metadata")]


def test_each_subsets_settings_apply_to_its_images_and_the_order_is_a_function_of_seed_and_step(tmp_path):
    plain = make_image_folder(tmp_path / "plain", count=3, seed=1)
    flipped = make_image_folder(tmp_path / "flipped", count=3, seed=2, captions=False)
    cfg = DataConfig(resolution=64, scan_cache=False, subsets=(
        SubsetConfig(dir=str(plain), repeats=2),
        SubsetConfig(dir=str(flipped), random_flip=True, caption="sks shape", caption_dropout=0.5)))
    examples = [e for scan in scan_subsets(cfg) for e in scan.examples]
    assert [e.subset for e in examples] == [0, 0, 0, 1, 1, 1]
    stream = BatchStream(examples, cfg, batch_size=2, seed=3)
    assert stream.batches_per_epoch == 5  # 3 images x 2 repeats + 3, in batches of 2 (one bucket)
    items = [item for k in range(40) for item in stream.items(k)]
    ones = [i for i in items if i.example.subset == 1]
    assert not any(i.flip for i in items if i.example.subset == 0) and any(i.flip for i in ones)
    assert {i.caption for i in ones} == {"", "sks shape"}
    assert {i.caption for i in items if i.example.subset == 0} == {e.caption for e in examples[:3]}
    rebuilt = BatchStream(examples, cfg, batch_size=2, seed=3)  # a resumed run's stream
    assert [rebuilt.items(k) for k in (39, 7, 0)] == [stream.items(k) for k in (39, 7, 0)]


def test_a_relative_image_dir_is_read_from_the_current_folder_and_kept_absolute(folders, monkeypatch):
    monkeypatch.chdir(folders)
    subsets = [{"image_dir": "hoge"}, {"image_dir": "./piyo", "metadata_file": "piyo/piyo_md.json"}]
    raw = {"datasets": [{"subsets": subsets}]}
    hoge, piyo = translate(raw, "d.toml", {})["data"]["subsets"]
    assert hoge["dir"] == str(folders / "hoge") and piyo["metadata_file"] == str(folders / "piyo" / "piyo_md.json")


def test_alpha_mask_turns_on_masked_loss_and_subsets_that_disagree_are_said(folders):
    raw = {"datasets": [{"subsets": [{"image_dir": str(folders / "hoge"), "alpha_mask": True},
                                     {"image_dir": str(folders / "fuga")}]}]}
    layer = translate(raw, "d.toml", warned := {})
    assert layer["data"]["masked_loss"] is True and "alpha_mask" not in layer["data"]["subsets"][0]
    assert list(warned) == ["alpha_mask"] and "data.masked_loss is one switch" in warned["alpha_mask"]


def test_a_data_folder_beside_the_configs_subsets_is_one_error_line(tmp_path):
    from sdtune.run import TrainRequest

    cfg = apply_layers(Config(), [({"data": {"subsets": [{"dir": "a"}]}}, "t")])
    with pytest.raises(SdtuneError, match=r"^--data \S+/images and the config's \[\[data.subsets\]\] both name"):
        TrainRequest(preset="cpu", data=tmp_path / "images").folder(cfg)
    assert TrainRequest(preset="cpu", data=None).folder(cfg) is None
    with pytest.raises(SdtuneError, match="no training images: pass --data"):
        TrainRequest(preset="cpu", data=None).folder(Config())
    # a missing dataset config was "data folder ... is not a folder" (review, issue 29)
    with pytest.raises(SdtuneError, match=r"^--data \S+/dataset.toml: that dataset config does not exist"):
        TrainRequest(preset="cpu", data=tmp_path / "dataset.toml").folder(Config())


def test_the_readme_examples_shuffle_caption_makes_a_presets_text_cache_give_way(folders, tmp_path):
    # review of issue 29: an SDXL preset plans data.cache_text=true; [general] shuffle_caption = true reached
    # only the subsets, so the preset's cache did not give way (as it does for --set data.shuffle_tags=true)
    # and the README example was refused: "data.cache_text stores one embedding per caption; ..."
    path = tmp_path / "dataset.toml"
    path.write_text(dreambooth_part(folders.as_posix()))
    cfg, _ = load_config("sdxl-12gb", ["data.resolution=512"], dataset=path)
    assert not cfg.data.cache_text and all(s.shuffle_tags for s in cfg.data.subsets)
    with pytest.raises(SdtuneError, match=r"data\.cache_text .* data\.shuffle_tags"):
        load_config("sdxl-12gb", ["data.cache_text=true"], dataset=path)  # asked for: refused, naming both


def test_a_subset_inside_another_subsets_folder_is_its_own_alone(tmp_path):
    # review of issue 29: sd-scripts reads each image_dir without its subfolders (train_util.glob_images), so
    # image_dir = 'nest' and image_dir = 'nest/extra' are 1 and 1 images; sdtune counted nest/extra's image in
    # both subsets, with the outer one's repeats and a file-name caption
    make_image_folder(tmp_path / "nest", count=1, seed=1)
    make_image_folder(tmp_path / "nest" / "extra", count=1, seed=2, captions=False)
    data = DataConfig(resolution=64, subsets=(SubsetConfig(dir=str(tmp_path / "nest"), repeats=2),
                                              SubsetConfig(dir=str(tmp_path / "nest" / "extra"), caption="extra")))
    outer, inner = scan_subsets(data)
    assert [e.image for e in outer.examples] == [tmp_path / "nest" / "img000.png"]
    assert [(e.image, e.caption) for e in inner.examples] == [(tmp_path / "nest" / "extra" / "img000.png", "extra")]


def test_a_resume_with_a_changed_subset_names_the_table_and_its_key():
    # review of issue 29: the refusal printed both whole tuples of SubsetConfig (kilobytes on one line)
    from sdtune.config.toml import resume_conflicts

    subsets = (SubsetConfig(dir="/a"), SubsetConfig(dir="/b", caption="cat"))
    saved = Config(data=DataConfig(subsets=subsets))
    changed = Config(data=DataConfig(subsets=(subsets[0], SubsetConfig(dir="/b", caption="dog", repeats=3))))
    assert resume_conflicts(saved, changed) == ["data.subsets 2 repeats: 1 -> 3",
                                                "data.subsets 2 caption: 'cat' -> 'dog'"]
    assert resume_conflicts(saved, Config(data=DataConfig(subsets=subsets[:1]))) == ["data.subsets: 2 tables -> 1"]
    assert resume_conflicts(saved, saved) == []
