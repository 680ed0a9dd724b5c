"""Finding images and captions, and every bad file a user's folder holds, before step 1 (issue 6).

Every image is generated here, a few dozen pixels wide; the whole file runs in a couple of seconds.
"""

import dataclasses
import io
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from sdtune.cli import app
from sdtune.config import DataConfig
from sdtune.data.captions import shuffle_tags
from sdtune.data.images import open_rgb, seen_size
from sdtune.data.scan import Example, Scan, Skip, scan_folder
from sdtune.data.verify import ImageProblem, check_image
from sdtune.errors import SdtuneError

CFG = DataConfig(resolution=64)  # smallest usable side: 32 px
W, H = 48, 40
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def near(a, b, tolerance=6):
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------------------
# Every image mode: written as a user's tools write it, read back as upright 8-bit RGB


def _rgb(path):
    Image.new("RGB", (W, H), RED).save(path)


def _rgba(path):
    im = Image.new("RGBA", (W, H), (255, 0, 0, 128))
    im.paste((0, 0, 255, 0), (0, 0, W // 2, H))  # left half fully transparent
    im.save(path)


def _la(path):
    Image.new("LA", (W, H), (0, 0)).save(path)  # black, fully transparent


def _palette_with_transparency(path):
    im = Image.new("P", (W, H), 0)
    im.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (W // 2, 0, W, H))  # right half: palette entry 1 (blue); left half: entry 0, transparent
    im.save(path, transparency=0)


def _gray(path):
    Image.new("L", (W, H), 100).save(path)


def _gray16(path):
    im = Image.new("I;16", (W, H), 65535)
    im.paste(32896, (0, 0, W // 2, H))
    im.save(path)


def _float_tiff(path):
    Image.new("F", (W, H), 0.5).save(path)


def _cmyk_jpeg(path):
    Image.new("CMYK", (W, H), (255, 0, 0, 0)).save(path, quality=95)  # pure cyan


def _animated_gif(path):
    Image.new("RGB", (W, H), RED).save(path, save_all=True, append_images=[Image.new("RGB", (W, H), BLUE)],
                                       duration=100, loop=0)


def _animated_webp(path):
    Image.new("RGB", (W, H), RED).save(path, save_all=True, append_images=[Image.new("RGB", (W, H), BLUE)],
                                       duration=100, lossless=True)


def _bmp(path):
    Image.new("RGB", (W, H), RED).save(path)


def _tiff(path):
    Image.new("RGB", (W, H), RED).save(path)


def _webp(path):
    Image.new("RGB", (W, H), RED).save(path, lossless=True)


# (file name, writer, pixel (x, y), its colour after open_rgb)
MODES = [
    ("rgb.png", _rgb, (5, 5), RED),
    ("rgba.png", _rgba, (5, 5), WHITE),
    ("rgba-half.png", _rgba, (W - 5, 5), (255, 127, 127)),
    ("la.png", _la, (5, 5), WHITE),
    ("palette.png", _palette_with_transparency, (5, 5), WHITE),
    ("palette-opaque.png", _palette_with_transparency, (W - 5, 5), BLUE),
    ("gray.png", _gray, (5, 5), (100, 100, 100)),
    ("gray16.png", _gray16, (W - 5, 5), WHITE),
    ("gray16-half.png", _gray16, (5, 5), (128, 128, 128)),
    ("float.tif", _float_tiff, (5, 5), (128, 128, 128)),
    ("cmyk.jpg", _cmyk_jpeg, (W // 2, H // 2), (0, 255, 255)),
    ("animated.gif", _animated_gif, (5, 5), RED),
    ("animated.webp", _animated_webp, (5, 5), RED),
    ("bitmap.bmp", _bmp, (5, 5), RED),
    ("scan.tiff", _tiff, (5, 5), RED),
    ("photo.webp", _webp, (5, 5), RED),
]


@pytest.mark.parametrize(("name", "write", "xy", "colour"), MODES, ids=[m[0] for m in MODES])
def test_every_image_mode_opens_as_8bit_rgb(tmp_path, name, write, xy, colour):
    write(tmp_path / name)
    if name == "gray16.png":
        assert Image.open(tmp_path / name).mode.startswith("I;16")  # the writer made what the test means
    im = open_rgb(tmp_path / name)
    assert im.mode == "RGB" and im.size == (W, H) == seen_size(tmp_path / name)
    assert near(im.getpixel(xy), colour), im.getpixel(xy)
    [example] = scan_folder(tmp_path, CFG).examples
    assert example.size == (W, H)


def test_exif_orientation_turns_the_image_and_its_size(tmp_path):
    stored = Image.new("RGB", (W, H), BLUE)
    stored.paste(RED, (0, 0, W // 2, H))  # stored: red left half; orientation 6 shows it turned 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    assert seen_size(tmp_path / "phone.jpg") == (H, W)
    im = open_rgb(tmp_path / "phone.jpg")
    assert im.size == (H, W)
    assert near(im.getpixel((H // 2, 5)), RED, 20) and near(im.getpixel((H // 2, W - 5)), BLUE, 20)
    assert scan_folder(tmp_path, CFG).examples[0].size == (H, W)


# ---------------------------------------------------------------------------------------------------------
# Bad files: each skipped once, with its kind, before step 1


def _truncated(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((W, H), 64).convert("RGB").save(buf, fmt)
    return buf.getvalue()[: len(buf.getvalue()) * 2 // 3]


def _bad_folder(tmp_path: Path) -> Path:
    _rgb(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(_truncated("PNG"))
    (tmp_path / "cut.jpg").write_bytes(_truncated("JPEG"))
    (tmp_path / "notes.png").write_text("not an image at all")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.new("RGB", (80, 80)).save(tmp_path / "bomb.png")     # over the limit (data.max_pixels=5000)
    Image.new("RGB", (200, 200)).save(tmp_path / "bomb2.png")  # over twice the limit: Pillow refuses to open it
    Image.new("RGB", (20, 64)).save(tmp_path / "tiny.png")
    _rgb(tmp_path / "garbled.png")
    (tmp_path / "garbled.txt").write_bytes(b"caf\x81")  # 0x81: neither UTF-8 nor Windows-1252
    _rgb(tmp_path / "locked.png")
    return tmp_path


@pytest.fixture
def small_bomb_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)


def _deny(monkeypatch, name):
    """Make opening one file fail as a permission error does (the test may run as root, who reads all)."""
    real_open = Image.open

    def open_(fp, *args, **kwargs):
        if Path(fp).name == name:
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_)


def test_each_bad_file_is_skipped_once_with_its_kind(tmp_path, monkeypatch):
    _deny(monkeypatch, "locked.png")
    scan = scan_folder(_bad_folder(tmp_path), dataclasses.replace(CFG, max_pixels=5000))
    assert [e.image.name for e in scan.examples] == ["good.png"]
    kinds = {s.path.name: s.kind for s in scan.skipped}
    assert kinds == {"empty.png": "empty", "cut.png": "corrupt", "cut.jpg": "corrupt", "notes.png": "not an image",
                     "broken.png": "corrupt", "bomb.png": "too large", "bomb2.png": "too large",
                     "tiny.png": "too small", "garbled.png": "bad caption", "locked.png": "unreadable"}
    assert len(scan.skipped) == len(kinds)  # once each
    assert all(s.detail and "\n" not in s.detail for s in scan.skipped)
    assert "20x64" in next(s.detail for s in scan.skipped if s.kind == "too small")
    assert scan.summary() == ("10 of 11 images skipped: 3 corrupt, 2 too large, 1 bad caption, 1 empty, "
                              "1 not an image, 1 too small, 1 unreadable")


def test_a_bomb_is_refused_without_the_scans_warning_filter(tmp_path, small_bomb_limit):
    Image.new("RGB", (80, 80)).save(tmp_path / "bomb.png")
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageProblem, match="too large"):
        check_image(tmp_path / "bomb.png", 32)


def test_a_file_without_read_permission_is_unreadable(tmp_path):
    _rgb(tmp_path / "good.png")
    _rgb(tmp_path / "locked.png")
    (tmp_path / "locked.png").chmod(0)
    try:
        scan = scan_folder(tmp_path, CFG)
    finally:
        (tmp_path / "locked.png").chmod(0o644)
    if os.geteuid() == 0:
        pytest.skip("running as root, who reads any file: chmod 000 cannot make one unreadable "
                    "(test_each_bad_file_is_skipped_once_with_its_kind covers the path with a patched open)")
    assert [(s.path.name, s.kind) for s in scan.skipped] == [("locked.png", "unreadable")]


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path, monkeypatch):
    _rgb(tmp_path / "good.png")
    _img(tmp_path / "locked" / "hidden.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "locked":  # as chmod 000 on a folder does, even under root
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    scan = scan_folder(tmp_path, CFG)
    assert [e.image.name for e in scan.examples] == ["good.png"]
    assert [(s.path.name, s.kind) for s in scan.skipped] == [("locked", "unreadable")]
    assert "cannot be listed" in scan.skipped[0].detail


def test_no_usable_image_is_an_error_that_says_why(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "tiny.png")
    with pytest.raises(SdtuneError, match=r"no usable images .*2 of 2 images skipped: 1 empty, 1 too small"):
        scan_folder(tmp_path, CFG)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(SdtuneError, match="no usable images .*found no"):
        scan_folder(tmp_path / "nothing", CFG)
    with pytest.raises(SdtuneError, match="does not exist"):
        scan_folder(tmp_path / "missing", CFG)


def test_summary_counts_with_thousands_and_most_common_first():
    skipped = [Skip(Path(f"{i}.png"), "too small", "x") for i in range(5)]
    skipped += [Skip(Path(f"c{i}.png"), "corrupt", "x") for i in range(7)]
    scan = Scan([Example(Path("ok.png"), "")] * 1028, skipped)
    assert scan.summary() == "12 of 1,040 images skipped: 7 corrupt, 5 too small"
    assert Scan([], []).summary() == ""


# ---------------------------------------------------------------------------------------------------------
# Discovery, captions and repeats


def _img(path: Path, size=(W, H)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, RED).save(path)


def test_discovery_is_recursive_case_blind_and_skips_hidden_and_cache_folders(tmp_path):
    for name in ("b/Z.JPG", "a.Jpeg", "b/c/d.TIFF", "e.bmp", ".hidden/x.png", ".sdtune-cache/y.png", "._a.png"):
        _img(tmp_path / name, size=(W, H)) if not name.startswith("._") else (tmp_path / name).write_bytes(b"\0")
    (tmp_path / "readme.md").write_text("not an image")
    (tmp_path / "b" / "loop").symlink_to(tmp_path, target_is_directory=True)  # a link back up the tree
    _img(tmp_path.parent / f"{tmp_path.name}-elsewhere" / "f.webp")
    (tmp_path / "linked").symlink_to(tmp_path.parent / f"{tmp_path.name}-elsewhere", target_is_directory=True)
    scan = scan_folder(tmp_path, CFG)
    found = [e.image.relative_to(tmp_path).as_posix() for e in scan.examples]
    assert found == ["a.Jpeg", "b/Z.JPG", "b/c/d.TIFF", "e.bmp", "linked/f.webp"] and not scan.skipped


def test_caption_precedence_sidecar_metadata_fixed_file_name(tmp_path):
    for name in ("side.png", "dotcaption.png", "upper.png", "meta.png", "plain_file-name.png"):
        _img(tmp_path / name)
    (tmp_path / "side.txt").write_bytes("\ufeffa red square,\nsecond line \n".encode())
    (tmp_path / "dotcaption.caption").write_text("from .caption")
    (tmp_path / "UPPER.TXT").write_text("upper-case sidecar")
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "side.png", "text": "loses to the sidecar"}\n\n'
        '{"file_name": "./meta.png", "text": "from metadata", "other": 1}\n')
    (tmp_path / "upper.png").rename(tmp_path / "UPPER.png")

    def captions(cfg):
        return {e.image.name: (e.caption, e.caption_source) for e in scan_folder(tmp_path, cfg).examples}

    assert captions(CFG) == {
        "side.png": ("a red square,", "sidecar"), "dotcaption.png": ("from .caption", "sidecar"),
        "UPPER.png": ("upper-case sidecar", "sidecar"), "meta.png": ("from metadata", "metadata"),
        "plain_file-name.png": ("plain file name", "file name")}
    fixed = DataConfig(resolution=64, caption="a photo of sks dog")
    assert captions(fixed)["plain_file-name.png"] == ("a photo of sks dog", "fixed")
    assert captions(fixed)["meta.png"] == ("from metadata", "metadata")
    (tmp_path / "side.tags").write_text("custom extension wins")
    assert captions(DataConfig(resolution=64, caption_extension=".tags"))["side.png"][0] == "custom extension wins"


def test_metadata_csv_and_jsonl_nearest_folder_wins(tmp_path):
    _img(tmp_path / "top.png")
    _img(tmp_path / "sub" / "x.png")
    _img(tmp_path / "sub" / "deeper" / "y.png")
    (tmp_path / "metadata.csv").write_text('file_name,text\ntop.png,"red, on white"\nsub/x.png,outer\n'
                                           "sub/deeper/y.png,from the top file\n")
    (tmp_path / "sub" / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "inner"}\n')
    got = {e.image.name: e.caption for e in scan_folder(tmp_path, CFG).examples}
    assert got == {"top.png": "red, on white", "x.png": "inner", "y.png": "from the top file"}


@pytest.mark.parametrize(("name", "content", "message"), [
    ("metadata.jsonl", '{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", text}\n',
     "metadata.jsonl line 2: not valid JSON"),
    ("metadata.jsonl", '{"file_name": "a.png", "text": null}\n', "metadata.jsonl line 1: text must be a string"),
    ("metadata.jsonl", '["a.png", "x"]\n', "metadata.jsonl line 1: expected a JSON object"),
    ("metadata.csv", "file_name,caption_text\na.png,x\n", "metadata.csv line 1: needs the columns file_name"),
    ("metadata.csv", "file_name,text\na.png,red,extra\n", "metadata.csv line 2: not as many fields"),
    ("metadata.csv", b"file_name,text\na.png,ok\nb.png,caf\xe9\n", "metadata.csv line 3: not UTF-8"),
])
def test_a_broken_metadata_file_is_one_error_naming_file_and_line(tmp_path, name, content, message):
    _img(tmp_path / "a.png")
    (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SdtuneError, match=message) as info:
        scan_folder(tmp_path, CFG)
    assert "\n" not in str(info.value)


def test_two_metadata_files_in_one_folder_are_an_error(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,y\n")
    with pytest.raises(SdtuneError, match="keep one"):
        scan_folder(tmp_path, CFG)


def test_kohya_repeat_folders_nearest_wins_and_name_the_caption(tmp_path):
    root = tmp_path / "3_data"  # the --data folder's own name never counts
    _img(root / "10_sks dog" / "a.png")
    _img(root / "10_sks dog" / "2_close up" / "b.png")
    (root / "10_sks dog" / "2_close up" / "b.txt").write_text("sidecar wins")
    _img(root / "0_zero" / "c.png")
    _img(root / "plain" / "d.png")
    got = {e.image.name: (e.repeats, e.caption, e.caption_source) for e in scan_folder(root, CFG).examples}
    assert got == {"a.png": (10, "sks dog", "folder name"), "b.png": (2, "sidecar wins", "sidecar"),
                   "c.png": (1, "c", "file name"), "d.png": (1, "d", "file name")}


def test_shuffle_tags_keeps_the_first_k_and_is_seeded():
    caption = "sks dog, red collar, grass,  sunny , bokeh"
    shuffled = [shuffle_tags(caption, 1, random.Random(seed)) for seed in range(20)]
    assert all(s.startswith("sks dog, ") for s in shuffled)
    assert all(sorted(s.split(", ")) == sorted(["sks dog", "red collar", "grass", "sunny", "bokeh"]) for s in shuffled)
    assert len(set(shuffled)) > 5
    assert shuffled[3] == shuffle_tags(caption, 1, random.Random(3))
    assert shuffle_tags(" a red star ", 0, random.Random(0)) == "a red star"
    assert shuffle_tags(caption, 9, random.Random(0)) == "sks dog, red collar, grass, sunny, bokeh"


# ---------------------------------------------------------------------------------------------------------
def test_a_caption_that_is_not_utf8_is_read_as_windows_1252_with_a_warning(tmp_path):
    for name in ("notepad.png", "bom.png", "unicode.png", "binary.png", "garbled.png", "plain.png"):
        _img(tmp_path / name)
    (tmp_path / "notepad.txt").write_bytes("café – crème brûlée".encode("cp1252"))
    (tmp_path / "bom.txt").write_bytes("\ufeffnaïve".encode())
    (tmp_path / "unicode.txt").write_bytes("smörgåsbord".encode("utf-16"))  # with its byte-order mark
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02 not text")
    (tmp_path / "garbled.txt").write_bytes(b"caf\x81")  # 0x81 is undefined in Windows-1252 too
    (tmp_path / "plain.txt").write_text("plain")
    scan = scan_folder(tmp_path, CFG)
    assert {e.image.name: e.caption for e in scan.examples} == {
        "notepad.png": "café – crème brûlée", "bom.png": "naïve", "unicode.png": "smörgåsbord", "plain.png": "plain"}
    details = {s.path.name: s.detail for s in scan.skipped if s.kind == "bad caption"}
    assert details.keys() == {"binary.png", "garbled.png"} and len(scan.skipped) == 2
    assert "NUL" in details["binary.png"] and "0x81 at offset 3" in details["garbled.png"]
    assert len(scan.warnings) == 1 and "1 caption file is not UTF-8" in scan.warnings[0]
    assert "notepad.txt" in scan.warnings[0] and "Windows-1252" in scan.warnings[0]
    (tmp_path / "notepad.txt").write_text("café", encoding="utf-8")
    assert scan_folder(tmp_path, CFG).warnings == ()
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path), "--preset", "cpu"])
    assert result.exit_code == 0 and "warning" not in result.output
    for i in range(5):
        _img(tmp_path / f"old{i}.png")
        (tmp_path / f"old{i}.txt").write_bytes("déjà vu".encode("cp1252"))
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path), "--preset", "cpu"])
    warning = next(line for line in result.output.splitlines() if line.startswith("warning"))
    assert "5 caption files are not UTF-8" in warning and "old0.txt, old1.txt, old2.txt and 2 more" in warning


# sdtune data check

runner = CliRunner()


def test_data_check_prints_counts_buckets_captions_and_problems(tmp_path):
    _img(tmp_path / "5_sks" / "wide.png", (256, 128))
    _img(tmp_path / "square.png", (128, 128))
    (tmp_path / "square.txt").write_text("a square")
    (tmp_path / "empty.jpg").write_bytes(b"")
    check = ["data", "check", str(tmp_path), "--preset", "cpu", "--set", "data.resolution=128"]
    result = runner.invoke(app, check)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "3 images in" in out and "2 usable, 6 with repeats" in out
    assert "128 x 128" in out and "128 x 64" in out  # wide.png goes to the 2:1 bucket
    assert "captions: 1 folder name, 1 sidecar" in out
    assert "empty.jpg (empty)" in out and "1 of 3 images skipped: 1 empty" in out
    squares = runner.invoke(app, [*check, "--set", "data.buckets=false"])
    assert squares.exit_code == 0 and "128 x 64" not in squares.output and "square crops" in squares.output


def test_data_check_exits_2_with_one_error_line_when_nothing_is_usable(tmp_path):
    (tmp_path / "a.png").write_text("text")
    result = runner.invoke(app, ["data", "check", str(tmp_path), "--preset", "cpu"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no usable images" in errors[0] and "Traceback" not in result.output
    assert "a.png (not an image)" in result.output
    missing = runner.invoke(app, ["data", "check", str(tmp_path / "missing")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_data_check_imports_no_torch(tmp_path):
    _img(tmp_path / "a.png", (64, 64))
    code = ("import sys; from sdtune.cli import app; sys.argv = ['sdtune', 'data', 'check', sys.argv[1], "
            "'--preset', 'cpu']\ntry: app()\nexcept SystemExit as e: assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True)


def test_train_reports_bad_files_once_and_trains_on_the_rest(tiny_sd1, images, tmp_path):
    import shutil

    from support.helpers import runner

    from sdtune.cli import app

    data = shutil.copytree(images, tmp_path / "data")
    sorted(data.glob("*.png"))[0].with_suffix(".txt").write_bytes("crème".encode("cp1252"))
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (data / "notes.jpg").write_text("not a picture")
    result = runner.invoke(app, ["train", "--preset", "cpu", "--data", str(data), "--model", str(tiny_sd1),
                                 "--out", str(tmp_path / "out"), "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.count("broken.png") == 1 and result.output.count("notes.jpg") == 1
    assert result.output.count("read as Windows-1252") == 1
    assert "2 of 8 images skipped" in result.output
