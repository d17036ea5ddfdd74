"""`radio-cache text`: a CLIP teacher's text tower run once, class embeddings stored in the store."""

import hashlib
import shutil

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from radio_distill.store import layout as L
from radio_distill.cache.text import spec_from_identity
from radio_distill.cli import cache_app
from radio_distill.errors import TeacherSpecError


def test_text_command_stores_normalised_class_embeddings(eval_setup, tmp_path):
    store = tmp_path / "copy.zarr"
    shutil.copytree(eval_setup.store, store)
    (tmp_path / "templates.txt").write_text("# prompts\na photo of a {}.\nan image of a {}\n")
    (tmp_path / "classes.txt").write_text("round circle\nsquare\nstar\ntriangle\n")
    result = CliRunner().invoke(cache_app, ["text", str(store), "--templates", str(tmp_path / "templates.txt"),
                                            "--classes", str(tmp_path / "classes.txt"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    root = zarr.open_group(store, mode="r")
    emb = root[L.text_array("clip")][:]
    assert emb.shape == (4, root["teachers/clip"].attrs["summary_dim"]) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    attrs = root[L.text_group("clip")].attrs
    assert attrs["classes"][0] == "round circle" and attrs["templates"] == ["a photo of a {}.", "an image of a {}"]
    assert attrs["identity"]["model"] == root["teachers/clip"].attrs["identity"]["model"]
    assert not np.allclose(emb, zarr.open_group(eval_setup.store, mode="r")[L.text_array("clip")][:])  # other prompts


def test_text_command_errors_are_one_line(eval_setup):
    runner = CliRunner()
    for args, words in ((["--teacher", "sam"], "sam teacher without a text tower"),
                        (["--teacher", "nope"], "no teacher 'nope'")):
        result = runner.invoke(cache_app, ["text", str(eval_setup.store), *args])
        assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output


def test_weight_files_are_found_by_path_and_checked_by_sha256(tmp_path):
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"weights")
    ident = {"family": "clip", "model": "ViT-B-16", "weights": "clip.pt", "resolution": 224, "random_init": False,
             "model_kwargs": {}, "sha256": hashlib.sha256(b"weights").hexdigest()}
    assert spec_from_identity("clip", ident, weights=weights).weights == str(weights)
    with pytest.raises(TeacherSpecError, match="pass --weights"):
        spec_from_identity("clip", ident)
    other = tmp_path / "other.pt"
    other.write_bytes(b"other")
    with pytest.raises(TeacherSpecError, match="sha256"):
        spec_from_identity("clip", ident, weights=other)
    tagged = {**ident, "weights": "openai", "sha256": None}
    assert spec_from_identity("clip", tagged).weights == "openai"


@pytest.mark.parametrize("classes, message", [
    (["n01440364", "n01443537", "n01484850", "n01491361"], "WordNet id (n01440364"),  # an ImageNet-style folder
    (["0", "1", "2", "3"], "names its classes by number (0, 1, ...)"),  # integer labels: tar cls, Parquet, a list
])
def test_class_names_that_are_not_words_need_a_classes_file(eval_setup, tmp_path, classes, message):
    store = tmp_path / "copy.zarr"
    shutil.copytree(eval_setup.store, store)
    root = zarr.open_group(store, mode="r+")
    dataset = dict(root.attrs["dataset"])
    dataset["classes"] = classes
    root.attrs["dataset"] = dataset
    result = CliRunner().invoke(cache_app, ["text", str(store), "--device", "cpu"])
    assert result.exit_code == 2 and message in result.output and "--classes" in result.output


@pytest.mark.parametrize("template, device, message", [
    ("a photo of a {} {}.", "cpu", "template 'a photo of a {} {}.': expected one '{}' for the class name"),  # IndexError
    ("a photo of a {x}.", "cpu", "template 'a photo of a {x}.': expected one '{}'"),  # KeyError
    ("a photo of a {.", "cpu", "template 'a photo of a {.': expected one '{}'"),  # ValueError
    ("a photo of a {}.", "garbage", "--device 'garbage': not a device here; use cpu, cuda or cuda:N"),  # RuntimeError
])
def test_bad_templates_and_devices_are_one_line_before_the_store_is_read(tmp_path, template, device, message):
    (tmp_path / "templates.txt").write_text(f"{template}\n")
    result = CliRunner().invoke(cache_app, ["text", str(tmp_path / "no-store.zarr"), "--device", device,
                                            "--templates", str(tmp_path / "templates.txt")])
    assert result.exit_code == 2 and result.output.startswith(f"error: {message}"), result.output
    assert len(result.output.strip().splitlines()) == 1
