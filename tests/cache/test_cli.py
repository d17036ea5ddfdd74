"""`radio-cache` on real tiny data through typer's CliRunner: build, info, verify, sample, help and errors."""

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from radio_distill.store import codecs
from radio_distill.store import layout as L
from radio_distill.store.dataset import load_rgb
from radio_distill.store.inspect import store_info
from radio_distill.cache.sample_data import BAD_FILES, CLASSES, make_sample_dataset
from radio_distill.cache import teachers
from radio_distill.cache.teachers import check_spec, parse_teacher
from radio_distill.store.views import crop_resize
from radio_distill.cli import cache_app
from radio_distill.errors import TeacherSpecError

runner = CliRunner()
COMMANDS = sorted(c.name or c.callback.__name__ for c in cache_app.registered_commands)


def _text(result) -> str:
    """stdout with rich's line wrapping (80 columns under CliRunner) undone."""
    return " ".join(result.stdout.split())


def _one_error_line(result) -> str:
    """The message of a failed command, which must be exactly one `error: ...` line on stderr, exit 2."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0].removeprefix("error: ")


def test_every_command_has_help():
    assert {"build", "info", "verify", "sample"} <= set(COMMANDS)
    top = runner.invoke(cache_app, ["--help"])
    assert top.exit_code == 0 and all(name in top.output for name in COMMANDS)
    for name in COMMANDS:
        result = runner.invoke(cache_app, [name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output and name in result.output, name
    build = runner.invoke(cache_app, ["build", "--help"]).output
    for option in ("--teacher", "--teachers", "--out", "--views", "--shard-size", "--overwrite", "--max-shards"):
        assert option in build


# Each spec fails in check_spec, before the dataset is read or Ray starts: the data path does not even exist.
SPEC_ERRORS = [
    ("dino:vit_base", "unknown teacher family 'dino'"),
    ("clip:ViT-Nope-16:openai", "unknown open_clip model 'ViT-Nope-16'"),
    ("dinov2:vit_nope_patch14_dinov2", "unknown timm model 'vit_nope_patch14_dinov2'"),
    ("sam:vit_x", "unknown SAM model 'vit_x'"),
    ("sam:vit_h:/nowhere/sam_vit_h.pth@1024", "weight file '/nowhere/sam_vit_h.pth' does not exist"),
    ("clip:ViT-B-16:nope", "unknown pretrained tag 'nope' for 'ViT-B-16'"),
    ("dinov2:vit_small_patch14_dinov2.nope", "unknown pretrained tag 'nope'"),
    ("dinov2:vit_small_patch14_dinov2:lvd142m", "DINOv2 weights 'lvd142m' must be a local file"),
]


@pytest.mark.parametrize("spec, culprit", SPEC_ERRORS)
def test_bad_teacher_is_one_line_before_any_work(tmp_path, spec, culprit):
    out = tmp_path / "x.zarr"
    result = runner.invoke(cache_app, ["build", str(tmp_path / "no-such-data"), "--out", str(out), "--teacher", spec])
    message = _one_error_line(result)
    assert culprit in message
    with pytest.raises(TeacherSpecError) as e:
        check_spec(parse_teacher(spec))
    assert message == str(e.value)  # printed as raised
    assert not out.exists()


# A pretrained tag's weights are looked up in the library's cache, then (online) asked of the hub, in the
# driver before the store or Ray exist. The tests point huggingface_hub at an empty temporary cache.
@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return cache


def _cache_file(cache: Path, repo: str, filename: str) -> None:
    """One file as huggingface_hub lays out its cache: refs/main names the snapshot holding it."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123456789abcdef")
    (folder / "snapshots" / "0123456789abcdef").mkdir(parents=True)
    (folder / "snapshots" / "0123456789abcdef" / filename).write_bytes(b"weights")


def _no_probe(source, timeout):
    raise AssertionError(f"asked the network for {source}")


TAGGED = [("clip:ViT-B-16:openai@224", "timm/vit_base_patch16_clip_224.openai/open_clip_model.safetensors"),
          ("dinov2:vit_small_patch14_dinov2.lvd142m", "timm/vit_small_patch14_dinov2.lvd142m/model.safetensors"),
          ("timm:vit_large_patch16_dinov3.lvd1689m", "timm/vit_large_patch16_dinov3.lvd1689m/model.safetensors")]


@pytest.mark.parametrize("spec, file", TAGGED)
def test_uncached_tag_offline_is_one_line_before_any_work(hub_cache, tmp_path, monkeypatch, spec, file):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(teachers, "probe", _no_probe)
    out = tmp_path / "x.zarr"
    start = time.monotonic()
    result = runner.invoke(cache_app, ["build", str(tmp_path / "no-such-data"), "--out", str(out), "--teacher", spec])
    message = _one_error_line(result)
    assert time.monotonic() - start < 30  # no download, no Ray: what it costs is importing the libraries
    assert f"({spec}): its weights {file}" in message and "HF_HUB_OFFLINE is set" in message
    assert str(hub_cache) in message and "pass a local weight file" in message
    assert not out.exists()


def test_uncached_tag_with_the_hub_unreachable_is_one_line(hub_cache, tmp_path, monkeypatch):
    def unreachable(source, timeout):
        assert timeout <= 10
        raise ConnectionError("[Errno -3] Temporary failure in name resolution\n(second line)")

    monkeypatch.setattr(teachers, "probe", unreachable)
    out = tmp_path / "x.zarr"
    result = runner.invoke(cache_app, ["build", str(tmp_path / "no-such-data"), "--out", str(out),
                                       "--teacher", "clip:ViT-B-16:openai"])
    message = _one_error_line(result)
    assert "teacher 'clip' (clip:ViT-B-16:openai): its weights timm/vit_base_patch16_clip_224.openai/" in message
    assert "the Hugging Face hub cannot be reached (ConnectionError: [Errno -3] Temporary failure" in message
    assert "clip:ViT-B-16:FILE" in message and not out.exists()


def test_uncached_tag_the_hub_refuses_is_one_line(hub_cache, monkeypatch):
    """A gated or private repository answers with an error status: said as a refusal, with its reason."""
    class Gated(Exception):
        response = "401"

    def refuses(source, timeout):
        raise Gated("Access to model timm/vit_large_patch16_dinov3.lvd1689m is restricted")

    monkeypatch.setattr(teachers, "probe", refuses)
    with pytest.raises(TeacherSpecError, match=r"the Hugging Face hub refuses them \(Gated: Access to model .* is "
                                               r"restricted\); download them on a machine"):
        teachers.check_weights_reachable(parse_teacher("timm:vit_large_patch16_dinov3.lvd1689m"))

def test_uncached_tag_the_hub_does_not_have_is_refused(hub_cache, monkeypatch):
    asked = []
    monkeypatch.setattr(teachers, "probe", lambda source, timeout: asked.append(source[3]) and False)
    with pytest.raises(TeacherSpecError, match="the hub does not have them either"):
        teachers.check_weights_reachable(parse_teacher("dinov2:vit_small_patch14_dinov2.lvd142m"))
    assert asked == ["model.safetensors", "pytorch_model.bin"]  # timm's order


def test_uncached_tag_the_hub_has_passes(hub_cache, monkeypatch):
    monkeypatch.setattr(teachers, "probe", lambda source, timeout: source[3] == "pytorch_model.bin")
    teachers.check_weights_reachable(parse_teacher("dinov2:vit_small_patch14_dinov2.lvd142m"))


@pytest.mark.parametrize("spec, file", [*TAGGED, ("dinov2:vit_small_patch14_dinov2",  # the default tag, its .bin
                                                  "timm/vit_small_patch14_dinov2.lvd142m/pytorch_model.bin")])
def test_cached_tag_passes_offline_without_asking(hub_cache, monkeypatch, spec, file):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(teachers, "probe", _no_probe)
    repo, _, filename = file.rpartition("/")
    _cache_file(hub_cache, repo, filename)
    teachers.check_weights_reachable(parse_teacher(spec))


def test_presets_and_weight_files_need_no_download(tmp_path, monkeypatch):
    monkeypatch.setattr(teachers, "probe", _no_probe)
    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"")
    for spec in [*teachers.tiny_teachers(), parse_teacher(f"clip:ViT-B-16:{weights}"),
                 parse_teacher(f"dinov2:vit_small_patch14_dinov2.lvd142m:{weights}")]:
        assert teachers.weight_sources(spec) == []
        teachers.check_weights_reachable(spec)


def test_bad_spec_syntax_is_one_line(tmp_path):
    result = runner.invoke(cache_app, ["build", str(tmp_path), "--out", str(tmp_path / "x.zarr"), "--teacher", "clip"])
    assert "bad teacher spec 'clip'" in _one_error_line(result)


def test_error_text_is_printed_verbatim(tmp_path):
    result = runner.invoke(cache_app, ["build", str(tmp_path), "--out", str(tmp_path / "x.zarr"), "--teacher", "clip"])
    assert "expected [name=]family:model[:weights][@resolution[xK]]" in _one_error_line(result)


@pytest.mark.parametrize("args, culprit", [
    (["--teachers", "tiny", "--pool", "sam=x"], "--pool 'sam=x': expected NAME=FACTOR"),
    (["--teachers", "tiny", "--pool", "dino=2"], "--pool names unknown teacher(s) ['dino']"),
    (["--teachers", "tiny", "--spatial-codec", "bf16"], "teacher 'clip': unknown codec 'bf16'"),
    ([], "no teachers given"),
])
def test_bad_build_options_are_one_line(tmp_path, args, culprit):
    result = runner.invoke(cache_app, ["build", str(tmp_path), "--out", str(tmp_path / "x.zarr"), *args])
    assert culprit in _one_error_line(result)


@pytest.mark.parametrize("args, culprit", [
    (["--teachers", "small"], "unknown preset 'small'; choose from: tiny"),
    (["--teachers", "tiny", "--teacher", "clip:ViT-B-16:openai"], "give --teachers tiny (a preset) or --teacher SPEC"),
    (["--teacher", "clip:radio-tiny-clip@0"], "resolution must be >= 1, got @0"),
    (["--teachers", "tiny", "--views", "0"], "--views must be >= 1, got 0"),
    (["--teachers", "tiny", "--shard-size", "0"], "--shard-size must be >= 1, got 0"),
    (["--teachers", "tiny", "--shard-size", "-1"], "--shard-size must be >= 1, got -1"),
    (["--teachers", "tiny", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--teachers", "tiny", "--pixels", "0"], "--pixels must be >= 1, got 0"),
    (["--teachers", "tiny", "--workers", "0"], "--workers must be >= 1, got 0"),
    (["--teachers", "tiny", "--max-shards", "-1"], "--max-shards must be >= 1, got -1"),
    (["--teachers", "tiny", "--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--teachers", "tiny", "--pool", "sam=0"], "teacher 'sam': pool factor must be >= 1, got 0"),
    (["--teachers", "tiny", "--pool", "sam=3"],
     "teacher 'sam': pool factor 3 does not divide its 8x8 grid; choose from 2, 4, 8"),  # it gave 2x2 silently
    (["--teachers", "tiny", "--pool", "clip=1000"],
     "teacher 'clip': pool factor 1000 does not divide its 8x8 grid"),  # a ZeroDivisionError
    (["--teachers", "tiny", "--pool", "dino=2"], "--pool names unknown teacher(s) ['dino']"),
    (["--teachers", "tiny", "--address", "127.0.0.1:1"], "no Ray cluster answers at --address 127.0.0.1:1"),
    (["--teachers", "tiny", "--address", "garbage"], "--address 'garbage': expected HOST:PORT of a Ray cluster's head"),
])
def test_silly_build_values_are_one_line_and_create_nothing(tmp_path, args, culprit):
    data = make_sample_dataset(tmp_path / "d", images=1, size=32)  # real images: only the option is wrong
    out = tmp_path / "x.zarr"
    assert culprit in _one_error_line(runner.invoke(cache_app, ["build", str(data), "--out", str(out), *args]))
    assert not out.exists()


def test_out_that_is_a_file_and_missing_data_are_one_line(tmp_path):
    data = make_sample_dataset(tmp_path / "d", images=1, size=32)
    out = tmp_path / "x.zarr"
    out.write_text("keep me")
    message = _one_error_line(runner.invoke(cache_app, ["build", str(data), "--out", str(out), "--teachers", "tiny"]))
    assert f"'{out}' is a file" in message and out.read_text() == "keep me"
    message = _one_error_line(runner.invoke(cache_app, ["build", str(data), "--out", str(out / "y.zarr"),
                                                        "--teachers", "tiny"]))
    assert message == f"--out '{out / 'y.zarr'}' lies under '{out}', which is a file, not a folder; give another --out"
    message = _one_error_line(runner.invoke(cache_app, ["build", str(tmp_path / "nope"), "--out",
                                                        str(tmp_path / "y.zarr"), "--teachers", "tiny"]))
    assert "does not exist" in message and not (tmp_path / "y.zarr").exists()


def test_a_toml_string_for_a_flag_is_one_line_and_deletes_nothing(tmp_path):
    out = tmp_path / "x.zarr"
    out.mkdir()
    (out / "zarr.json").write_text("{}")  # whatever is there: the config is refused before it is looked at
    config = tmp_path / "cache.toml"
    config.write_text(f'data = "{tmp_path}"\nout = "{out}"\nteachers = "tiny"\noverwrite = "false"\n')
    message = _one_error_line(runner.invoke(cache_app, ["build", "--config", str(config)]))
    assert message == f"""config '{config}': 'overwrite' must be true or false, got "false\""""
    assert [p.name for p in out.iterdir()] == ["zarr.json"]


def test_a_report_that_cannot_be_written_is_refused_before_the_build(tmp_path):
    data = make_sample_dataset(tmp_path / "d", images=1, size=32)
    for report in (tmp_path / "missing" / "r.json", tmp_path / "d"):
        message = _one_error_line(runner.invoke(cache_app, ["build", str(data), "--out", str(tmp_path / "x.zarr"),
                                                            "--teachers", "tiny", "--report", str(report)]))
        assert message == f"--report '{report}': not a file in an existing folder"
    assert not (tmp_path / "x.zarr").exists()


def test_missing_out_and_empty_data_are_one_line(tmp_path):
    assert "missing 'out'" in _one_error_line(runner.invoke(cache_app, ["build", str(tmp_path), "--teachers", "tiny"]))
    result = runner.invoke(cache_app, ["build", str(tmp_path), "--out", str(tmp_path / "x.zarr"), "--teachers", "tiny"])
    assert "holds no images" in _one_error_line(result)


def test_build_reports_the_store(cli_store):
    path, result = cli_store
    assert result.exit_code == 0, result.output
    out = _text(result)
    assert f"store {path}: 58 samples x 2 views, complete" in out and "ran 15 shards, 58 images" in out
    assert "only 55 of 58 samples ok (94.8%): 3 unreadable, 0 not built" in out  # in yellow: none retryable
    assert "may read on a rerun" not in out
    for name, reason in BAD_FILES.items():
        assert f"unreadable: {name}: {reason}" in out


def test_info_prints_teachers_and_unreadable_files(cli_store):
    path, _ = cli_store
    result = runner.invoke(cache_app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    out = _text(result)
    assert "58 samples x 2 views" in out and f"{len(CLASSES)} classes" in out and "shards 15/15 done" in out
    for name in ("clip", "dinov2", "sam"):
        assert f"{name}: {name} " in out
    assert "tiny preset" in out and "spatial int8" in out and "fidelity (mean/min cos) spatial 0.99" in out
    for name, reason in BAD_FILES.items():
        assert f"unreadable: {name}: {reason}" in out


def test_info_json_lists_unreadable_files_by_name(cli_store):
    path, _ = cli_store
    result = runner.invoke(cache_app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["unreadable"] == BAD_FILES
    assert info == json.loads(json.dumps(store_info(path)))


def test_verify_passes_then_names_a_corrupted_chunk(cli_store, tmp_path):
    path, _ = cli_store
    result = runner.invoke(cache_app, ["verify", str(path)])
    assert result.exit_code == 0, result.output
    assert f"ok: {path}: 58 samples, 44 arrays verified" in _text(result)

    copy = shutil.copytree(path, tmp_path / "copy.zarr")
    shard = copy / L.target_array("clip", "spatial") / "c" / "2" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    message = _one_error_line(runner.invoke(cache_app, ["verify", str(copy)]))
    assert message.startswith("teachers/clip/spatial: sample '") and "fails to decode" in message


@pytest.mark.parametrize("command", ["info", "verify"])
def test_info_and_verify_refuse_what_is_not_a_store(tmp_path, command):
    assert "no zarr.json" in _one_error_line(runner.invoke(cache_app, [command, str(tmp_path)]))


def test_sample_writes_a_labelled_dataset(tmp_path):
    result = runner.invoke(cache_app, ["sample", str(tmp_path / "s"), "--images", "8", "--size", "32"])
    assert result.exit_code == 0, result.output
    images = tmp_path / "s" / "images"
    scenes = sorted(p.relative_to(images).as_posix() for p in images.glob("*/*.jpg"))
    assert len(scenes) == 8 and {s.split("/")[0] for s in scenes} == set(CLASSES)
    assert len(list((tmp_path / "s" / "masks").glob("*/*.png"))) == 8
    assert all((images / name).exists() for name in BAD_FILES)  # --bad is the default
    result = runner.invoke(cache_app, ["sample", str(tmp_path / "clean"), "--images", "4", "--no-bad"])
    assert result.exit_code == 0 and not list((tmp_path / "clean" / "images").glob("*.*"))


def test_sample_refuses_nonsense_and_a_folder_in_use(tmp_path):
    used, notes = tmp_path / "used", tmp_path / "used" / "notes.txt"
    used.mkdir()
    notes.write_text("keep me")
    for args, message in (
            (["--images", "-5"], "--images must be >= 1, got -5"),  # "wrote -5 images"
            (["--size", "0"], "--size must be >= 1, got 0"),
            ([str(used)], f"'{used}' is not empty; give a new or empty folder"),  # its files were overwritten
            ([str(notes / "s")], f"OUT '{notes / 's'}' lies under '{notes}', which is a file")):
        folder = [] if args[0].startswith("/") else [str(tmp_path / "new")]
        assert _one_error_line(runner.invoke(cache_app, ["sample", *folder, *args])).startswith(message)
    assert [p.name for p in tmp_path.iterdir()] == ["used"] and [p.name for p in used.iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert runner.invoke(cache_app, ["sample", str(tmp_path / "empty"), "--images", "1", "--no-bad"]).exit_code == 0


@pytest.fixture(scope="module")
def toml_build(ray_session, weight_files, sample_dataset, tiny_store, tmp_path_factory):
    """`radio-cache build --config` with per-teacher storage, users' weight files and a CSV list with a missing
    file, into a folder that already holds another store: (out, result without --overwrite, with it)."""
    folder = tmp_path_factory.mktemp("toml")
    data = folder / "data"
    rows = ["path,label"]
    for cls in ("circle", "star"):
        for src in sorted((sample_dataset / cls).glob("*.jpg"))[:3]:
            (data / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, data / cls / src.name)
            rows.append(f"{cls}/{src.name},{cls}")
    rows.append("gone.jpg,star")
    (data / "list.csv").write_text("\n".join(rows) + "\n")
    out = shutil.copytree(tiny_store, folder / "cache.zarr")
    clip, sam = weight_files["clip"][1], weight_files["sam"][1]
    config = folder / "cache.toml"
    config.write_text(f"""
data = "{data / 'list.csv'}"
out = "{out}"
views = 1
shard_size = 4
workers = 4  # more than Ray's 2 CPUs: capped, not left waiting for a CPU forever
[[teachers]]
spec = "clip:radio-tiny-clip:{clip}@64"
spatial = "fp16"
[[teachers]]
spec = "sam:tiny:{sam}"
pool = 2
""")
    refused = runner.invoke(cache_app, ["build", "--config", str(config)])
    result = {}
    thread = threading.Thread(target=lambda: result.update(built=runner.invoke(
        cache_app, ["build", "--config", str(config), "--overwrite"])), daemon=True)
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive(), "the build hangs"
    return out, refused, result["built"]


@pytest.mark.slow
def test_config_build_refuses_another_store_then_overwrites_it(toml_build):
    out, refused, built = toml_build
    message = _one_error_line(refused)
    assert "was built with other" in message and "teachers" in message and "--overwrite" in message
    assert built.exit_code == 0, built.output
    root = zarr.open_group(out, mode="r")
    assert root.attrs["num_samples"] == 7 and root.attrs["views"] == 1
    assert sorted(root.attrs["settings"]["teachers"]) == ["clip", "sam"] and "teachers/dinov2" not in root


def test_config_per_teacher_storage(toml_build, tiny_store):
    out, _, _ = toml_build
    root = zarr.open_group(out, mode="r")
    clip, sam = root[L.teacher_group("clip")].attrs, root[L.teacher_group("sam")].attrs
    assert clip["storage"] == {"spatial": "fp16", "summary": "fp16", "pool": 1}
    assert root[L.target_array("clip", "spatial")].dtype == np.float16
    assert L.scale_array("clip", "spatial") not in root  # fp16 has no scale array
    assert sam["storage"] == {"spatial": "int8", "summary": "fp16", "pool": 2}
    assert sam["source_grid"] == [8, 8] and sam["grid"] == [4, 4]  # pooled by 2
    assert root[L.target_array("sam", "spatial")].shape == (7, 1, 4, 4, 32)
    assert root[L.scale_array("sam", "spatial")].shape == (7, 1, 4, 4)
    # fidelity is measured back at the teacher's grid, so pooling shows in it
    pooled = sam["fidelity"]["spatial"]["mean_cos"]
    unpooled = zarr.open_group(tiny_store, mode="r")[L.teacher_group("sam")].attrs["fidelity"]["spatial"]["mean_cos"]
    assert 0 < pooled < unpooled and clip["fidelity"]["spatial"]["mean_cos"] > 0.9999


def test_config_weight_files_reach_the_workers(toml_build, weight_files):
    out, _, _ = toml_build
    root = zarr.open_group(out, mode="r")
    for name in ("clip", "sam"):
        _, path, _ = weight_files[name]
        ident = root[L.teacher_group(name)].attrs["identity"]
        assert ident["weights"] == path.name and ident["random_init"] is False and ident["preset"] is None
        assert len(ident["sha256"]) == 64
        assert root.attrs["weight_files"][name] == str(path.resolve())  # where the build found it, beside the identity
    # the stored CLIP targets are those of the perturbed weights in the file, not of a random init
    _, _, teacher = weight_files["clip"]
    k = 0
    image, span, _ = load_rgb(Path(root.attrs["dataset"]["root"]) / str(root[L.IDS][k]), min_side=64)
    pixels = crop_resize(image, root[L.BOXES][k, 0], 64, span=span)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(teacher.mean).view(1, 3, 1, 1)) / torch.tensor(teacher.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        _, spatial = teacher(x)
    stored = torch.from_numpy(root[L.target_array("clip", "spatial")][k]).float()
    assert codecs.token_cosine(spatial, stored).min() > 0.9999


def test_config_list_file_labels_and_missing_file(toml_build):
    out, _, _ = toml_build
    root = zarr.open_group(out, mode="r")
    ids = list(root[L.IDS][:])
    assert ids[-1] == "gone.jpg" and ids[0].startswith("circle/")
    assert list(root[L.LABELS][:]) == [0, 0, 0, 1, 1, 1, 1]  # classes from the CSV: circle, star
    assert root.attrs["dataset"]["classes"] == ["circle", "star"]
    assert root[L.STATUS][6] == L.MISSING and root[L.ERRORS][6] == "missing file"
    assert store_info(out)["unreadable"] == {"gone.jpg": "missing file"}
    assert (root[L.STATUS][:6] == L.OK).all()


def test_config_build_says_loudly_what_a_rerun_may_retry(toml_build):
    _, _, built = toml_build
    out = " ".join(built.stdout.split())
    assert "only 6 of 7 samples ok (85.7%): 1 unreadable, 0 not built" in out
    assert "unreadable: gone.jpg: missing file" in out
    assert "1 unreadable samples may read on a rerun (missing file or I/O error)" in out
