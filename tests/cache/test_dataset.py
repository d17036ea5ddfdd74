"""Datasets: folders and list files become stable manifests; odd images load as RGB or are refused with a reason."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radio_distill.store.dataset import IMAGE_EXTENSIONS, UnreadableImage, load_rgb, scan_dataset, text_labels
from radio_distill.cache.sample_data import BAD_FILES, CLASSES, write_bad_files
from radio_distill.errors import DatasetError


def test_folder_ids_are_sorted_relative_paths_with_subfolder_labels(sample_dataset):
    m = scan_dataset(sample_dataset)
    assert m.root == sample_dataset.resolve() and m.classes == CLASSES
    assert list(m.ids) == sorted(m.ids) and len(m) == 48 + 10
    for sample_id, label in zip(m.ids, m.labels):
        if "/" in sample_id:
            assert label == CLASSES.index(sample_id.split("/")[0]) and sample_id.endswith(".jpg")
        else:
            assert label == -1  # the bad files sit at the top level
    assert not any(i.startswith("../") or "masks" in i for i in m.ids)
    assert m.fingerprint() == scan_dataset(str(sample_dataset) + "/").fingerprint()


def test_csv_list_with_header_labels_and_relative_paths(tmp_path):
    (tmp_path / "list.csv").write_text("path,label\n# a comment\nb/2.jpg,dog\na/1.jpg, cat\n\nc.jpg,\n")
    m = scan_dataset(tmp_path / "list.csv")
    assert m.root == tmp_path.resolve()  # paths are relative to the list file's folder
    assert m.ids == ("b/2.jpg", "a/1.jpg", "c.jpg")  # the file's order
    assert m.classes == ("cat", "dog") and m.labels == (1, 0, -1)


def test_integer_labels_of_a_list_are_those_integers(tmp_path):
    """Sorted as names, label 2 came after 10 (stored as 1): class order no longer matched the numbers."""
    (tmp_path / "list.csv").write_text("a.jpg,2\nb.jpg,10\nc.jpg, 0\nd.jpg\ne.jpg,-1\n")
    m = scan_dataset(tmp_path / "list.csv")
    assert m.labels == (2, 10, 0, -1, -1) and m.classes == tuple(str(k) for k in range(11))
    (tmp_path / "mixed.csv").write_text("a.jpg,2\nb.jpg,10\nc.jpg,cat\n")  # not all integers: names, sorted
    m = scan_dataset(tmp_path / "mixed.csv")
    assert m.labels == (1, 0, 2) and m.classes == ("10", "2", "cat")


def test_a_byte_order_mark_is_not_part_of_the_header(tmp_path):
    (tmp_path / "list.csv").write_text("\ufeffpath,label\na.jpg,cat\n", encoding="utf-8")  # as Excel saves CSV
    m = scan_dataset(tmp_path / "list.csv")
    assert m.ids == ("a.jpg",) and m.classes == ("cat",) and m.labels == (0,)


def test_plain_list_and_its_missing_file(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "here.png")
    (tmp_path / "list.txt").write_text("here.png\nsub/gone.jpg\n")
    m = scan_dataset(tmp_path / "list.txt")
    assert m.ids == ("here.png", "sub/gone.jpg") and m.labels == (-1, -1) and m.classes == ()
    assert load_rgb(m.root / m.ids[0], min_side=8)[0].size == (8, 8)
    with pytest.raises(UnreadableImage, match="^missing file$"):
        load_rgb(m.root / m.ids[1], min_side=8)


def test_manifest_fingerprint_changes_with_ids_and_labels(tmp_path):
    (tmp_path / "a.csv").write_text("x.jpg,cat\ny.jpg,dog\n")
    (tmp_path / "b.csv").write_text("x.jpg,dog\ny.jpg,cat\n")
    (tmp_path / "c.csv").write_text("x.jpg,cat\ny.jpg,dog\n")
    a, b, c = (scan_dataset(tmp_path / f"{k}.csv").fingerprint() for k in "abc")
    assert a == c and a != b


@pytest.mark.parametrize("text, culprit", [
    ("a.jpg\nb.jpg,cat,extra\n", r"line 2: expected 'path' or 'path,label', got \['b.jpg', 'cat', 'extra'\]"),
    ("a.jpg\nb.jpg\na.jpg\n", "line 1 'a.jpg' and line 3 'a.jpg' are the same image 'a.jpg'"),
    ("path,label\n", "holds no images"),
    ("a.jpg,cat\n,dog\n", r"line 2: no path in \['', 'dog'\]; each line is 'path' or 'path,label'"),
    ("a.jpg,3\nb.jpg,-2\n", r"line 2: label -2 is below -1 \(-1: unlabelled\)"),
])
def test_bad_list_files(tmp_path, text, culprit):
    (tmp_path / "list.csv").write_text(text)
    with pytest.raises(DatasetError, match=culprit):
        scan_dataset(tmp_path / "list.csv")


def test_list_paths_are_normalised_relative_to_the_list_folder(tmp_path):
    (tmp_path / "list.csv").write_text(f"./b.jpg,dog\nsub/../a.jpg,cat\nsub//c.jpg\n{tmp_path.resolve()}/d/e.jpg,cat\n")
    m = scan_dataset(tmp_path / "list.csv")
    assert m.ids == ("b.jpg", "a.jpg", "sub/c.jpg", "d/e.jpg") and m.labels == (1, 0, -1, 0)


@pytest.mark.parametrize("path", ["../x.jpg", "sub/../../x.jpg", "/etc/hostname", "/x.jpg"])
def test_list_path_outside_its_folder_is_refused_naming_line_and_path(tmp_path, path):
    (tmp_path / "list.txt").write_text(f"a.jpg\n# a comment\n{path}\n")
    with pytest.raises(DatasetError) as e:
        scan_dataset(tmp_path / "list.txt")
    assert f"line 3: '{path}' is outside the list's folder" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("second", ["./b.jpg", "sub/../b.jpg", "b.jpg", "sub/./../b.jpg"])
def test_one_image_under_two_spellings_is_refused_naming_both(tmp_path, second):
    """Two spellings of one file would give it two labels, and could put it in both splits."""
    (tmp_path / "list.csv").write_text(f"path,label\nb.jpg,cat\na.jpg,cat\n{second},dog\n")
    with pytest.raises(DatasetError, match=f"line 2 'b.jpg' and line 4 '{second}' are the same image 'b.jpg'"):
        scan_dataset(tmp_path / "list.csv")


def _tree(root: Path, files) -> None:
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"")


def test_folder_walk_gives_the_ids_of_a_plain_recursive_listing(tmp_path):
    _tree(tmp_path, ["b/x.JPEG", "b/y.png", "a/sub/deep/z.jpg", "a/notes.txt", "a-b/w.jpg", "top.webp", "a b/v.gif",
                     "c.jpg/inner.png", "noext", "a/sub/.hidden.jpg", "b/.jpg", "b/dot.", "b/x.jpg.txt"])
    reference = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())  # the scanner before os.scandir
    m = scan_dataset(tmp_path)
    assert list(m.ids) == reference == ["a b/v.gif", "a-b/w.jpg", "a/sub/.hidden.jpg", "a/sub/deep/z.jpg", "b/x.JPEG",
                                        "b/y.png", "c.jpg/inner.png", "top.webp"]
    assert m.classes == ("a", "a b", "a-b", "b", "c.jpg") and m.labels == (1, 2, 0, 0, 3, 3, 4, -1)


def test_folder_symlinks_are_followed_once_and_loops_end(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    _tree(root, ["real/a.jpg", "real/sub/b.jpg"])
    _tree(outside, ["c.jpg"])
    (root / "real" / "sub" / "loop").symlink_to(root / "real")  # back up to an ancestor
    (root / "self").symlink_to(".")
    (root / "shared").symlink_to(outside)  # outside the root: followed, the id stays inside
    (root / "zz_again").symlink_to(root / "real" / "sub")  # a second path to a folder already walked
    (root / "dead").symlink_to(tmp_path / "gone")
    m = scan_dataset(root)
    assert m.ids == ("real/a.jpg", "real/sub/b.jpg", "shared/c.jpg") and m.classes == ("real", "shared")


def test_unreadable_folder_is_named(tmp_path, monkeypatch):
    _tree(tmp_path, ["a/x.jpg", "b/y.jpg"])
    scandir = os.scandir

    def refuse(path):
        if Path(path).name == "b":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(DatasetError, match=f"dataset folder '{tmp_path / 'b'}' cannot be read: Permission denied"):
        scan_dataset(tmp_path)


def test_empty_or_missing_dataset(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="holds no images"):
        scan_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nowhere")


def _gradient(width=64, height=48) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    x, y = xx * 255 // (width - 1), yy * 255 // (height - 1)
    return np.stack([x, y, 255 - x], -1).astype(np.uint8)


def test_odd_modes_load_as_the_rgb_they_show(tmp_path):
    rgb = _gradient()
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    im, span, size = load_rgb(tmp_path / "cmyk.jpg", min_side=32)
    assert im.mode == "RGB" and span == (0, 0, 64, 48) and size == (64, 48) and np.abs(np.asarray(im).astype(int) - rgb).mean() < 4

    ramp = (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)  # 0..63960
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    a = np.asarray(load_rgb(tmp_path / "grey16.png", min_side=32)[0]).astype(int)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    assert (np.abs(a[..., 0] - ramp / 257) <= 1).all()  # scaled to 8 bits, not clipped at 255

    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.png")
    a = np.asarray(load_rgb(tmp_path / "grey.png", min_side=32)[0])
    assert a.shape == (48, 64, 3) and (a == np.asarray(Image.fromarray(rgb).convert("L"))[..., None]).all()

    rgba = np.dstack([rgb, np.full((48, 64), 255, np.uint8)])
    rgba[:, :32, 3] = 0  # left half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    a = np.asarray(load_rgb(tmp_path / "rgba.png", min_side=32)[0])
    assert (a[:, :32] == 255).all() and (a[:, 32:] == rgb[:, 32:]).all()  # composited on white

    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(tmp_path / "palette.png")
    assert (np.asarray(load_rgb(tmp_path / "palette.png", min_side=32)[0]) == np.asarray(palette.convert("RGB"))).all()


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(_gradient()).save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg", min_side=32)[0].size == (48, 64)
    im, span, size = load_rgb(tmp_path / "rotated.jpg", min_side=8)  # decoded at half size, then rotated
    assert im.size == (24, 32) and span == (0, 0, 48, 64) and size == (48, 64)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("bad")
    return folder, write_bad_files(folder, huge=True)


def test_bad_files_are_refused_with_their_reason(bad_files):
    folder, refused = bad_files
    assert refused == BAD_FILES
    for name, reason in refused.items():
        with pytest.raises(UnreadableImage) as e:
            load_rgb(folder / name, min_side=64)
        assert str(e.value) == reason


@pytest.mark.parametrize("name, size", [("cmyk.jpg", (64, 48)), ("grey16.png", (40, 40)), ("grey.jpg", (64, 48)),
                                        ("rgba.png", (64, 48)), ("palette.png", (64, 48)), ("one_pixel.png", (1, 1))])
def test_odd_files_load_as_rgb(bad_files, name, size):
    im, span, source = load_rgb(bad_files[0] / name, min_side=112)
    assert im.mode == "RGB" and im.size == size == source and span == (0, 0, *size)
    assert np.asarray(im).std() > 0 or name == "one_pixel.png"


def test_huge_jpeg_is_decoded_at_reduced_scale(bad_files):
    im, span, size = load_rgb(bad_files[0] / "huge.jpg", min_side=112)
    assert im.mode == "RGB" and im.size == (1500, 1125)  # 1/8, still >= 2 x min_side
    assert span == (0, 0, 12000, 9000) and size == (12000, 9000)
    assert np.abs(np.asarray(im).astype(int) - (20, 120, 200)).max() <= 2
    big, span, _ = load_rgb(bad_files[0] / "huge.jpg", min_side=1000)  # a bigger teacher gets more pixels
    assert span == (0, 0, 12000, 9000) and big.size == (3000, 2250)


def test_too_many_pixels_is_refused(tmp_path, monkeypatch):
    from radio_distill.store import dataset

    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(dataset, "MAX_PIXELS", 200 * 100 - 1)
    with pytest.raises(UnreadableImage, match=r"too large: 200x100 pixels \(limit 19999\)"):
        load_rgb(tmp_path / "big.png", min_side=8)


def test_a_file_name_that_is_not_utf8_is_refused_at_scan_naming_its_bytes(tmp_path):
    """It was a UnicodeEncodeError once Ray had started, leaving `.partial/` behind."""
    Image.new("RGB", (8, 8)).save(tmp_path / "good.jpg")
    (tmp_path / "sub").mkdir()
    name = os.fsencode(tmp_path / "sub") + b"/bad\xff.jpg"
    os.close(os.open(name, os.O_WRONLY | os.O_CREAT))
    with pytest.raises(DatasetError) as e:
        scan_dataset(tmp_path)
    assert str(e.value) == (f"dataset '{tmp_path}': the name {name!r} is not UTF-8, and the store keeps sample ids as "
                            "UTF-8 text; rename it (e.g. `convmv -f latin1 -t utf8`)")


def test_an_image_decodes_within_its_memory_bound_or_is_refused(tmp_path, monkeypatch):
    """A 141 KB 16-bit PNG of 8000x8000 took 2.6 GB in a worker (float64 copies of its grey); only its pixel
    count was bounded. Now the bytes its mode takes are (`decoded_bytes`), and the 16 -> 8 bit step is float32."""
    import tracemalloc

    from radio_distill.store import dataset

    Image.fromarray((np.arange(1000 * 800).reshape(800, 1000) % 65536).astype(np.uint16)).save(tmp_path / "g16.png")
    need = dataset.decoded_bytes((1000, 800), "I;16")
    assert need == 1000 * 800 * (2 * 2 + 4 + 4)
    monkeypatch.setattr(dataset, "MAX_DECODED", need - 1)
    with pytest.raises(UnreadableImage, match=r"^too large to decode: 1000x800 pixels of mode I;16 take 9\.2 MiB "
                                              r"\(limit 9\.2 MiB\)$"):
        load_rgb(tmp_path / "g16.png", min_side=32)
    monkeypatch.setattr(dataset, "MAX_DECODED", need)
    tracemalloc.start()  # numpy's arrays (and Pillow's bytes) are counted, not Pillow's own pixels
    try:
        image = load_rgb(tmp_path / "g16.png", min_side=32).image
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.size == (1000, 800) and peak < 7 * 1000 * 800  # float64: 8 bytes a pixel for each of its copies


def test_a_class_number_too_large_to_be_a_class_is_refused(tmp_path):
    """A label of 3000000 (an id, not a class) made a 56 MB zarr.json listing '0' .. '2999999'."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.jpg")
    (tmp_path / "list.csv").write_text("a.jpg,3\nb.jpg,3000000\n")
    with pytest.raises(DatasetError, match=r"line 2: label 3000000 would make 3000001 classes; class numbers run 0, 1, "
                                           r"\.\.\. below 100000"):
        scan_dataset(tmp_path / "list.csv")
    assert text_labels(["3", "", "99999"], str)[1][-1] == "99999"
