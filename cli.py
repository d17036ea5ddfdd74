"""Command lines: `radio-cache` (build, info, pattern, verify, sample, text), `radio-train`, `radio-eval` and
`radio-export`.

Each command parses options, builds a config and calls one library function; a
`RadioDistillError` is printed as one line and exits with status 2.
"""

import json
import os
import shlex
import sys
from functools import wraps
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import RadioDistillError

console = Console(stderr=True)
if not sys.stdout.isatty():  # --help into a log or a pipe: wide enough that no option name is cut (typer reads it lazily)
    os.environ.setdefault("TERMINAL_WIDTH", "150")


def _stdout() -> Console:
    """Results on stdout; without a terminal (Slurm, CI, `| tee`) lines are never wrapped at 80 columns."""
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 10_000)


cache_app = typer.Typer(help="Cache teacher targets once into a Zarr store: build, info, pattern, verify, sample, text.",
                        no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def _one_line_errors(fn):
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RadioDistillError as e:
            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper


def _pairs(values: list[str], option: str) -> dict[str, int]:
    out = {}
    for v in values:
        name, _, factor = v.partition("=")
        if not factor.isdigit():
            raise RadioDistillError(f"{option} '{v}': expected NAME=FACTOR, e.g. sam=2")
        out[name] = int(factor)
    return out


def _budgets(values: list[str]) -> dict[str | None, float]:
    """--fidelity values: '0.99' for every teacher, 'NAME=0.995' for one."""
    out = {}
    for v in values:
        name, _, budget = v.rpartition("=")
        try:
            out[name or None] = float(budget)
        except ValueError:
            raise RadioDistillError(f"--fidelity '{v}': expected a mean cosine like 0.99, or NAME=0.995") from None
    return out


def _packed(info: dict) -> str:
    """' (12 tar files)' for tars and Parquet, nothing for a folder or list."""
    return f" ({info['dataset_files']} {info['dataset_kind']} files)" if info["dataset_files"] else ""


@cache_app.command()
@_one_line_errors
def build(
    data: Annotated[Optional[Path], typer.Argument(help="Image folder (recursive, following directory symlinks; subfolders = labels), list file (path[,label] per line, relative to the list's folder; paths outside it and images listed twice are refused), WebDataset tar shards or Parquet files: a path, glob or brace pattern, quoted, e.g. 'shards/{000000..000123}.tar' or 'data/train-*.parquet'.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output store: a folder, e.g. cache.zarr, or s3://bucket/prefix/cache.zarr (endpoint and credentials from the AWS_* environment variables).")] = None,
    teacher: Annotated[Optional[list[str]], typer.Option("--teacher", "-t", help="Teacher spec [name=]family:model[:weights][@res[xK]], repeatable (xK: also a KxK-tiled high-resolution map, entry name_xK): clip:ViT-L-14:openai@224, dinov2:vit_large_patch14_reg4_dinov2.lvd142m@448, sam:vit_h:/path/sam_vit_h.pth@1024, sam2:configs/sam2.1/sam2.1_hiera_l.yaml:/path/sam2.1_hiera_large.pt@1024, sam3:facebook/sam3@1008 (or a save_pretrained folder); families: clip, dinov2, sam, sam2, sam3, timm.")] = None,
    teachers: Annotated[Optional[str], typer.Option("--teachers", help="Preset: 'tiny' = offline toy CLIP, DINOv2 and SAM with seeded random weights; 'toy' = small CLIP, DINOv2 and SAM trained on generated scenes (toy preset: trained on generated scenes; cache/toy/*.safetensors).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML file with any of these settings; options given here win.")] = None,
    views: Annotated[Optional[int], typer.Option(help="Views per image: view 0 = centre square, others random-resized crops. [default: 1]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the random views. [default: 0]")] = None,
    shard_size: Annotated[Optional[int], typer.Option(help="Samples per shard (the work unit and file). [default: 256]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Teacher batch size. [default: 64]")] = None,
    spatial_codec: Annotated[Optional[str], typer.Option(help="Spatial target codec: int8 (per-token absmax) or fp16. [default: int8]")] = None,
    summary_codec: Annotated[Optional[str], typer.Option(help="Summary target codec: fp16 or int8. [default: fp16]")] = None,
    pool: Annotated[Optional[list[str]], typer.Option(help="Average-pool a teacher's spatial grid: NAME=FACTOR, e.g. sam=2. [default: no pooling]")] = None,
    sam_spatial: Annotated[Optional[str], typer.Option(help="SAM spatial target: neck (256 ch) or preneck; SAM 2, SAM 3: neck (the image embedding), s1 or s0 (the high-resolution levels their decoders also read). [default: neck]")] = None,
    fidelity: Annotated[Optional[list[str]], typer.Option(help="Fidelity budget instead of codecs: a calibration pass picks, per teacher and target, the smallest encoding (int8, rotated int8, PCA...) whose mean token cosine on held-back samples is at least this; 0.99 for all, or NAME=0.995 for one (repeatable).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Ray workers when there is no GPU (with GPUs: one per GPU). [default: 1]")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address; default starts Ray locally.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing store at --out first.")] = False,
    max_shards: Annotated[Optional[int], typer.Option(help="Stop after this many new shards (resume later with the same command). [default: all]")] = None,
    pixels: Annotated[Optional[int], typer.Option(help="Also store every view at RxR (uint8, ~150 KB per view at 224) so training reads pixels instead of decoding JPEGs; use the student resolution.")] = None,
    tar_samples: Annotated[Optional[int], typer.Option(help="Tars without img2dataset sidecars: plan this many rows per tar (at least its samples) and let each build worker list its tar, instead of listing every tar's headers before the build. [default: list them]")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Also write the final report as JSON here.")] = None,
):
    """Run every teacher once over DATA and write their targets to a Zarr store (resumable)."""
    from .cache.build import build_cache
    from .cache.config import load_cache_config

    if teachers and teacher:
        raise RadioDistillError(f"give --teachers {teachers} (a preset) or --teacher SPEC (repeatable), not both")
    if report is not None and (report.is_dir() or not report.parent.is_dir()):  # else found after the whole build
        raise RadioDistillError(f"--report '{report}': not a file in an existing folder")
    cfg = load_cache_config(config, teachers=teachers or teacher, spatial_codec=spatial_codec,
                            summary_codec=summary_codec, pools=_pairs(pool or [], "--pool"), sam_spatial=sam_spatial,
                            fidelity=_budgets(fidelity or []),
                            data=data, out=out, views=views, seed=seed, shard_size=shard_size, batch_size=batch_size,
                            workers=workers, address=address, overwrite=overwrite or None, max_shards=max_shards, pixels=pixels,
                            tar_samples=tar_samples)
    result = build_cache(cfg)
    if report:
        report.write_text(json.dumps(result, indent=2))
    _print_report(result)
    if result["failed"]:  # after the report: what was done is shown, and the exit status says it is not all
        failed = list(result["failed"])
        causes = sorted(set(result["failed"].values()), key=list(result["failed"].values()).count, reverse=True)
        raise RadioDistillError(f"{len(failed)} of {result['shards']} shards failed (shard {_few(failed)}): {causes[0]}"
                                f"{f' (and {len(causes) - 1} other causes above)' if len(causes) > 1 else ''}; "
                                f"fix it, then rerun: {shlex.join(['radio-cache', *sys.argv[1:]])}")


def _few(items: list, shown: int = 10) -> str:
    return ", ".join(map(str, items[:shown])) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _print_report(r: dict) -> None:
    out = _stdout()
    state = "complete" if r["complete"] else "partial (rerun the same command to resume)"
    out.print(f"store {r['store']}: {r['samples']} samples x {r['views']} views, {state}")
    out.print(f"ran {r['shards_run']} shards, {r['images_run']} images in {r['seconds']:.1f} s"
              + (f" ({r['images_per_s']:.1f} images/s)" if r["images_per_s"] else ""))
    if r["workers"]:  # where the teachers ran: one actor per GPU Ray lists, else CPU actors
        w = r["workers"]
        gpus = sum(len(p["gpu_ids"]) for p in w)
        kinds = {f"{p['device'].split(':')[0]}, {p['autocast'] or 'fp32'}" for p in w}
        out.print(f"on {len(w)} Ray workers ({gpus} GPUs) on {len({p['node'] for p in w})} nodes: "
                  f"teachers on {'; '.join(sorted(kinds))}")
    cal = r["calibration"]
    if cal:  # its cost: a share of this run's time, or reused from the run that made the store
        share = f"{cal['seconds'] / (cal['seconds'] + r['seconds']):.1%} of this run" if cal["ran"] else "reused"
        out.print(f"calibration: {cal['samples']} samples ({cal['held']} held back) in {cal['seconds']:.1f} s ({share})")
    table = Table("teacher", "codecs (spatial/summary)", "views/s (forward)", "bytes/view", "fidelity (mean/min cos)")
    for name, t in r["teachers"].items():
        fid = t["fidelity"] or {}
        cos = "  ".join(f"{k} {v['mean_cos']:.5f}/{v['min_cos']:.5f}" for k, v in fid.items())
        speed = f"{t['views_per_s']:.1f}" if t["views_per_s"] else "-"
        st = t["storage"]
        table.add_row(name, f"{st['spatial']}/{st['summary']}", speed, f"{t['bytes_per_view']:,.0f}", cos)
    out.print(table)
    bad = r["unreadable"]
    for path, reason in list(bad.items())[:20]:
        out.print(f"  unreadable: {escape(path)}: {escape(reason)}", highlight=False)
    if len(bad) > 20:
        out.print(f"  ... and {len(bad) - 20} more (`radio-cache info --json` lists them all)")
    if r["ok"] < r["samples"]:  # said loudly: training would see only these
        colour = "yellow" if r["complete"] and not r["retryable"] else "bold red"
        out.print(f"[{colour}]only {r['ok']} of {r['samples']} samples ok ({r['ok'] / r['samples']:.1%}): "
                  f"{len(bad)} unreadable, {r['samples'] - r['ok'] - len(bad)} not built[/]", highlight=False)
    if r["retryable"]:
        out.print(f"[bold red]{r['retryable']} unreadable samples may read on a rerun (missing file or I/O error): "
                  "put the files back or give the dataset's current folder, then rerun the same command[/]",
                  highlight=False)
    by_cause = {}
    for shard, cause in r["failed"].items():
        by_cause.setdefault(cause, []).append(shard)
    for cause, shards in by_cause.items():
        out.print(f"[bold red]failed: shard {_few(shards)}: {escape(cause)}[/]", highlight=False)


@cache_app.command()
@_one_line_errors
def info(store: Annotated[str, typer.Argument(help="A store made by `radio-cache build`: a folder or an s3:// URL.")],
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
         picture: Annotated[Optional[Path], typer.Option(help="Also draw the teachers' fixed patterns (`radio-cache pattern`) into this PNG: per teacher, the pattern's norm at each grid position over the RMS of its tokens.")] = None):
    """Show a store's teachers, dims, codecs, fidelity, fixed patterns, sizes, shards done and unreadable samples."""
    from .store.inspect import store_info

    if picture is not None and (picture.is_dir() or not picture.parent.is_dir()):
        raise RadioDistillError(f"--picture '{picture}': not a file in an existing folder")
    i = store_info(store)
    if picture is not None:
        _pattern_picture(i, picture)
    if as_json:
        print(json.dumps(i, indent=2))
        return
    out = _stdout()
    out.print(f"[bold]{i['store']}[/] ({i['created_by']}, layout v{i['layout_version']})", highlight=False)
    out.print(f"  {i['samples']} samples x {i['views']} views from {i['dataset']}{_packed(i)}, {len(i['classes'])} classes; "
              f"shards {i['shards_done']}/{i['shards_total']} done; {i['bytes'] / 1e6:.1f} MB of shard files"
              + (f"; view pixels stored at {i['pixels']} px" if i["pixels"] else ""), highlight=False)
    from .store.group import weights_label

    for name, t in i["teachers"].items():
        ident, st, fid = t["identity"], t["storage"], t["fidelity"] or {}
        weights = f":{ident['weights']}" if ident.get("weights") else ""
        out.print(f"[bold]{name}[/]: {ident['family']} {ident['model']}{weights}{f' ({weights_label(ident)})' if weights_label(ident) else ''} "
                  f"@{t['resolution']}, grid {'x'.join(map(str, t['grid']))}, summary {t['summary_dim'] or '-'}, "
                  f"spatial {t['spatial_dim']}", highlight=False)
        if t["tiles"]:
            k, overlap = t["tiles"]["tiles"], t["tiles"]["overlap"]
            out.print(f"  high-resolution map of {k}x{k} tiles at {ident['resolution']} px overlapping by {overlap} px "
                      f"over a {t['resolution']} px view", highlight=False)
        codecs = f"spatial {st['spatial']}" + (f" pooled x{st['pool']}" if st["pool"] > 1 else "")
        codecs += f", summary {st['summary']}" if t["summary_dim"] else ""
        if t["calibration"]:  # what the budget picked, and how it measured on held-back calibration samples
            codecs += f" (picked by --fidelity {st['fidelity']}; held-back cos " + ", ".join(
                f"{k} {v['cos_mean']:.5f}/{v['cos_min']:.5f}{'' if v['met'] else ' BUDGET NOT MET'}"
                for k, v in t["calibration"].items()) + ")"
        cos = ", ".join(f"{k} {v['mean_cos']:.5f}/{v['min_cos']:.5f}" for k, v in fid.items()) or "not measured yet"
        out.print(f"  codecs {codecs}; fidelity (mean/min cos) {cos}; {t['bytes_per_view']:,.0f} bytes/view; "
                  f"shards {t['shards_done']}/{i['shards_total']}", highlight=False)
        p = t["pattern"]
        if p is None:
            out.print(f"  fixed pattern: not estimated (`radio-cache pattern {i['store']}`)", highlight=False)
        elif "error" in p:
            out.print(f"  [bold red]fixed pattern: {escape(p['error'])}[/]", highlight=False)
        else:
            out.print(f"  fixed pattern: RMS {p['ratio']:.4f} of the tokens' about their mean (noise floor "
                      f"{p['noise']:.4f}), from {p['samples']} samples, {p['maps']} maps", highlight=False)
    if i["calibration"]:
        c = i["calibration"]
        out.print(f"calibration: view 0 of {c['samples']} samples spread over the dataset ({c['held']} held back), "
                  f"{c['seconds']:.1f} s", highlight=False)
    out.print(f"samples: ok {i['ok']}, pending {i['pending']}, unreadable {len(i['unreadable'])}"
              + (f", absent {i['absent']} (rows planned past their tar's samples)" if i["absent"] else ""))
    for path, reason in i["unreadable"].items():
        out.print(f"  unreadable: {path}: {reason}", highlight=False)


def _pattern_picture(i: dict, path: Path) -> None:
    """Draw the fixed patterns `info` found (`store_info` output `i`) into `path`; one line when there are none."""
    from .evaluate.pictures import pattern_png
    from .store.group import open_store
    from .store.location import location
    from .store.pattern import read_pattern

    names = [n for n, t in i["teachers"].items() if t["pattern"] and "error" not in t["pattern"]]
    if not names:
        raise RadioDistillError(f"--picture: store '{i['store']}' holds no fixed pattern to draw; run "
                                f"`radio-cache pattern {i['store']}` first")
    where = location(i["store"])
    root = open_store(where)
    pattern_png(path, {n: read_pattern(where, root, n) for n in names}, note=i["store"])


@cache_app.command()
@_one_line_errors
def pattern(store: Annotated[str, typer.Argument(help="A complete store made by `radio-cache build`: a folder or an s3:// URL.")],
            samples: Annotated[Optional[int], typer.Option(help="Read this many usable samples, spread evenly over the dataset. [default: all of them]")] = None):
    """Estimate each teacher's fixed pattern and store it, for `radio-train --denoise mean`: per position of its
    grid, the mean of its spatial targets over every view of every sample minus their mean over all positions,
    with the variance there. Reads each sample's spatial targets once (no image, no teacher); a rerun replaces it."""
    from .cache.pattern import estimate_patterns

    r = estimate_patterns(store, samples=samples, progress=True)
    out = _stdout()
    for name, t in r["teachers"].items():
        out.print(f"{name}: grid {'x'.join(map(str, t['grid']))}, pattern RMS {t['ratio']:.4f} of the tokens' about "
                  f"their mean (noise floor {t['noise']:.4f})", highlight=False)
    out.print(f"wrote the fixed patterns of {len(r['teachers'])} teachers to {r['store']} from {r['samples']} samples "
              f"x {r['views']} views in {r['seconds']:.1f} s", highlight=False)


@cache_app.command()
@_one_line_errors
def verify(store: Annotated[str, typer.Argument(help="A store made by `radio-cache build`: a folder or an s3:// URL.")],
           images: Annotated[Optional[Path], typer.Option(help="Also hash every image (the dataset's folder, where it is now) and compare it with the bytes its targets were computed from. Default: images not read.")] = None,
           repair: Annotated[bool, typer.Option(help="Instead of stopping at the first fault, find every done shard whose files were lost or altered and mark it not done, so that rerunning the same `radio-cache build` redoes it (a rerun lists no files).")] = False):
    """Check every array training reads: every shard done, every chunk present, passing its checksum, of its
    shape, finite and holding what its build recorded (layout v4 on); with --images, the images too."""
    from .store.inspect import repair_store, verify_store

    if repair:
        found = repair_store(store)
        for shard, why in found.items():
            _stdout().print(f"shard {shard}: {why}; marked not done", highlight=False)
        _stdout().print(f"{len(found)} shards to redo: rerun the same `radio-cache build`" if found else
                        f"ok: {store}: no done shard lost or altered", highlight=False)
        return

    r = verify_store(store, images=images, progress=True)
    hashed = f", {r['images']} images match" if "images" in r else ""
    legacy = "" if r["records"] else " (layout before v4: no integrity record, files checked for presence only)"
    _stdout().print(f"ok: {r['store']}: {r['samples']} samples, {r['arrays']} arrays verified{hashed}{legacy}")


@cache_app.command()
@_one_line_errors
def sample(out: Annotated[Path, typer.Argument(help="Folder to write the sample dataset into: a new or empty one.")],
           images: Annotated[int, typer.Option(help="Number of labelled scene images.")] = 64,
           size: Annotated[int, typer.Option(help="Image side in pixels (the one-shape sample; --scenes come at odd sizes of 96-176 px).")] = 96,
           scenes: Annotated[bool, typer.Option(help="The generated world of the toy teachers: 1-3 shapes x colours x sizes on textured backgrounds, with captions (scenes.jsonl), class masks and instance masks.")] = False,
           seed: Annotated[int, typer.Option(help="Seed of the images (train and held-out sets: different seeds).")] = 0,
           bad: Annotated[bool, typer.Option(help="Add the bad files real datasets hold (empty, truncated, CMYK...).")] = True):
    """Generate a labelled sample dataset with masks (shapes on textures), for demos and tests."""
    from .cache.sample_data import make_sample_dataset, write_bad_files
    from .cache.world import write_scenes
    from .store.location import check_folder

    check_folder(out, "OUT")
    if out.is_dir() and any(out.iterdir()):  # its files would be overwritten or mixed into the dataset
        raise RadioDistillError(f"'{out}' is not empty; give a new or empty folder")
    if scenes:
        folder = write_scenes(out, images=images, seed=seed)
        if bad:
            write_bad_files(folder)
        _stdout().print(f"wrote {images} scenes to {folder} (class masks in {out / 'masks'}, instance masks in "
                        f"{out / 'instances'}, captions and objects in {out / 'scenes.jsonl'})")
        return
    folder = make_sample_dataset(out, images=images, size=size, seed=seed, bad=bad)
    _stdout().print(f"wrote {images} images to {folder} (masks in {out / 'masks'})")


def _numbers(option: str, text: str | None, *, sets: bool = False) -> tuple | None:
    """'224' or '224,384,512' -> (224,) or (224, 384, 512); with `sets`, '128/256,512' -> ((128, 256), 512).
    The config checks the values."""
    if text is None:
        return None
    try:
        if sets:
            return tuple(tuple(int(s) for s in v.split("/")) if "/" in v else int(v) for v in text.split(","))
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        example = "224,384 or 128/256,512/1024" if sets else "224,384"
        raise RadioDistillError(f"{option} {text!r}: expected whole numbers separated by commas, e.g. {example}") from None


def _per_teacher(option: str, given: list[str] | None, kind: type, expected: str) -> dict:
    """['sam=0.5', ...] -> {'sam': kind('0.5'), ...}; the config checks the values."""
    out = {}
    for text in given or []:
        name, _, value = text.partition("=")
        try:
            out[name] = kind(value)
        except ValueError:
            raise RadioDistillError(f"{option} '{text}': expected {expected}") from None
    return out


train_app = typer.Typer(help="Distil a student from a store's cached targets, never loading a teacher.",
                        pretty_exceptions_enable=False, add_completion=False)


@train_app.command()
@_one_line_errors
def train(
    store: Annotated[Optional[str], typer.Argument(help="Store made by `radio-cache build`: a folder or an s3:// URL.")] = None,
    student: Annotated[Optional[str], typer.Option(help="Student: eradio_small/base/large, vitdet_tiny/small/base or any timm model name, e.g. vit_base_patch16_224, convnext_tiny. [default: vit_small_patch16_224]")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder: checkpoint/, student/, metrics.csv, tensorboard/.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (or give --epochs).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Epochs over the training split (or give --steps).")] = None,
    batch_size: Annotated[Optional[str], typer.Option(help="Global batch size over all processes; with --resolution-policy partition one per resolution, e.g. 64,16. [default: 64]")] = None,
    resolution: Annotated[Optional[str], typer.Option(help="Student input side, or several, e.g. 224,384,512: each a multiple of the student's stride; every side trains on the same stored views and targets. [default: 224]")] = None,
    resolution_policy: Annotated[Optional[str], typer.Option(help="With several resolutions: random (one per step, seeded) or partition (every step one part per resolution, its own --batch-size; a part given as a set, 128/256/384, draws its side each step, seeded). [default: random]")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (AdamW, warmup + cosine). [default: 1e-3]")] = None,
    loss: Annotated[Optional[str], typer.Option(help="amradio (cos + SmoothL1) or phis (MSE on PHI-S standardised targets). [default: amradio]")] = None,
    teacher_weight: Annotated[Optional[list[str]], typer.Option(help="Per-teacher loss weight NAME=W, e.g. sam=0.5.")] = None,
    upsample: Annotated[Optional[list[str]], typer.Option(help="A teacher whose grid is finer than the student's: its head draws K x K tokens per student token, NAME=K, e.g. sam=2 (a bilinear upsampling blurs the edges SAM's mask decoder needs).")] = None,
    denoise: Annotated[Optional[str], typer.Option(help="Keeping the teachers' position-fixed artifacts out of the student: none (targets as stored), mean (each spatial target less its teacher's fixed pattern, which `radio-cache pattern STORE` estimates first) or shift (the student's view is compared with the teacher's map of another cached view of the image, resampled through their boxes over their overlap, so a pattern fixed to the teacher's grid does not stay put). [default: none]")] = None,
    holdout: Annotated[Optional[float], typer.Option(help="Fraction of sample ids held out for radio-eval. [default: 0.05]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of initialisation and data order. [default: 0]")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader processes per training process. [default: the cores per process, minus one]")] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Log metrics every N steps. [default: 10]")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps (and at the end). [default: 500]")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda, cuda:1 or cpu. [default: cuda if available]")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML recipe; options given here win.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out exactly where its checkpoint stopped.")] = False,
    init: Annotated[Optional[Path], typer.Option(help="Start from a trained student: a run folder, a student folder (or radio-export hf folder) or its model.safetensors. Its backbone comes over, and its heads of the teachers this store has too; new teachers get new heads. --student defaults to its student; --steps 0 saves it as it starts.")] = None,
    stop_at: Annotated[Optional[int], typer.Option(help="End this session after this step, checkpointed (for time-limited jobs); continue with --resume.")] = None,
    allow_partial: Annotated[bool, typer.Option(help="Train on the finished shards of an incomplete store.")] = False,
    images: Annotated[Optional[Path], typer.Option(help="The image folder, when it moved since the build. [default: the root recorded in the store]")] = None,
    ray_workers: Annotated[Optional[int], typer.Option(help="Train on this many Ray Train workers (multi-node); default: this process, or torchrun's.")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address for --ray-workers.")] = None,
):
    """Distil a student from STORE. Multi-GPU: `torchrun --nproc-per-node 8 $(which radio-train) STORE ...`."""
    from .train.config import load_train_config
    from .train.loop import train as run_training

    weights = _per_teacher("--teacher-weight", teacher_weight, float, "NAME=WEIGHT, e.g. sam=0.5")
    factors = _per_teacher("--upsample", upsample, int, "NAME=K, a whole number, e.g. sam=2")
    cfg = load_train_config(config, device_here=ray_workers is None, store=store, student=student, out=out, steps=steps, epochs=epochs,
                            batch_size=_numbers("--batch-size", batch_size), resolution=_numbers("--resolution", resolution, sets=True),
                            resolution_policy=resolution_policy, lr=lr, holdout=holdout, seed=seed,
                            workers=workers, log_every=log_every, checkpoint_every=checkpoint_every, device=device,
                            resume=resume or None, stop_at=stop_at, allow_partial=allow_partial or None, images=images,
                            init=init, denoise=denoise, upsample=factors or None,
                            loss={"kind": loss, "teacher_weights": weights or None})
    if ray_workers is not None:  # 0 is refused there, not taken for "train here"
        from .train.on_ray import train_on_ray
        train_on_ray(cfg, workers=ray_workers, address=address)
        return
    result = run_training(cfg)
    _stdout().print(f"trained to step {result['step']} of {result['steps']}; student saved to {Path(result['out']) / 'student'} "
                    "(load it with radio_distill.student.load_student)")


export_app = typer.Typer(help="Export a trained student: ONNX, a Hugging Face folder, or a ViT (or ViTDet) backbone for timm.",
                         pretty_exceptions_enable=False, add_completion=False)
EXPORT_FORMATS = ("onnx", "hf", "timm")


@export_app.command()
@_one_line_errors
def export(
    run: Annotated[Path, typer.Argument(help="A `radio-train` run folder (its --out) or a saved student folder.")],
    out: Annotated[Path, typer.Argument(help="Folder to write (onnx, hf), or the .safetensors file (timm).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx: one graph per --sides, batch dynamic, onnxruntime / TensorRT; hf: transformers.AutoModel.from_pretrained(OUT, trust_remote_code=True); timm: a ViT or ViTDet backbone for timm.create_model.")] = "onnx",
    sides: Annotated[Optional[str], typer.Option(help="ONNX input sides (square), e.g. 224,448: one graph each. [default: the side the student was trained at]")] = None,
    feature_fmt: Annotated[str, typer.Option(help="Layout of the spatial features: NLC (RADIO's) or NCHW (onnx, hf).")] = "NLC",
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
):
    """Export RUN's student to OUT: RADIO's interface (pixels in [0, 1], (summary, features) per teacher)."""
    from .student import export_hf, export_onnx, export_timm

    if fmt not in EXPORT_FORMATS:
        raise RadioDistillError(f"--format {fmt!r}: choose from {', '.join(EXPORT_FORMATS)}")
    if sides is not None and fmt != "onnx":
        raise RadioDistillError(f"--sides is for --format onnx; a {fmt} export takes any side")
    if fmt == "onnx":
        manifest = export_onnx(run, out, sides=_numbers("--sides", sides), feature_fmt=feature_fmt, opset=opset)
        graphs = ", ".join(f"{side}: {file}" for side, file in manifest["sides"].items())
        _stdout().print(f"wrote {out}: {graphs} and onnx.json; input 'pixels' (B, 3, S, S) in [0, 1], "
                        f"outputs {', '.join(manifest['outputs'])}", highlight=False)
    elif fmt == "hf":
        export_hf(run, out, feature_fmt=feature_fmt)
        _stdout().print(f"wrote {out}: load it with transformers.AutoModel.from_pretrained('{out}', "
                        "trust_remote_code=True)", highlight=False)
    else:
        print(json.dumps(export_timm(run, out)))


@cache_app.command()
@_one_line_errors
def text(store: Annotated[str, typer.Argument(help="A store made by `radio-cache build`: a folder or an s3:// URL.")],
         classes: Annotated[Optional[Path], typer.Option(help="Class names, one per line in label order. (default: the store's classes)")] = None,
         templates: Annotated[Optional[Path], typer.Option(help="Prompt templates with {}, one per line. (default: 'a photo of a {}.' and a few more)")] = None,
         teacher: Annotated[str, typer.Option(help="The CLIP teacher of the store whose text tower to run.")] = "clip",
         weights: Annotated[Optional[Path], typer.Option(help="Local weight file, when the teacher was built from one (checked by sha256). [default: where the build found it, or the toy preset's in cache/toy/, if unchanged]")] = None,
         device: Annotated[Optional[str], typer.Option(help="cuda or cpu. (default: cuda if available)")] = None):
    """Run a CLIP teacher's text tower once; store normalised class embeddings for zero-shot evaluation."""
    from .cache.text import read_lines, write_text_embeddings

    r = write_text_embeddings(store, teacher=teacher, classes=read_lines(classes, "classes") if classes else None,
                              templates=read_lines(templates, "templates") if templates else None,
                              weights=weights, device=device)
    _stdout().print(f"wrote {r['classes']} class embeddings ({r['dim']} dims, {r['templates']} templates each) "
                    f"to {r['store']}/{r['array']}")


eval_app = typer.Typer(help="Measure a trained student against its teachers on the held-out split, with pictures.",
                       pretty_exceptions_enable=False, add_completion=False)


@eval_app.command()
@_one_line_errors
def evaluate(
    store: Annotated[str, typer.Argument(help="The store the run was trained from: a folder or an s3:// URL.")],
    run: Annotated[Path, typer.Argument(help="A `radio-train` run folder (its --out).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.md, report.json, features.png, curves.png.")],
    masks: Annotated[Optional[Path], typer.Option(help="PNG label maps mirroring the images, for the dense probe. (default: IMAGES/../masks if it exists)")] = None,
    instances: Annotated[Optional[Path], typer.Option(help="PNG instance maps mirroring the images (object number + 1, 0 background), for SAM's point-prompt mask IoU against ground truth. (default: IMAGES/../instances if it exists)")] = None,
    max_bank: Annotated[int, typer.Option(help="Train samples in the kNN bank (a seeded subset when more).")] = 10000,
    k: Annotated[int, typer.Option("--k", help="kNN neighbours.")] = 20,
    probe_images: Annotated[int, typer.Option(help="Images per split for the dense probe (a seeded subset when more).")] = 500,
    probe_steps: Annotated[int, typer.Option(help="Full-batch AdamW steps of each dense linear probe.")] = 300,
    pictures: Annotated[int, typer.Option(help="Held-out images shown in features.png (and in sam_masks.png).")] = 4,
    resolution: Annotated[Optional[int], typer.Option(help="Student input side. (default: the run's; the largest of a multi-resolution run's)")] = None,
    resolutions: Annotated[Optional[str], typer.Option(help="Also measure fidelity at each of these input sides, e.g. 224,448 (a table and fidelity_resolution.png). (default: a multi-resolution run's sides)")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per student forward.")] = 64,
    workers: Annotated[int, typer.Option(help="DataLoader processes (0 = read in this process).")] = 2,
    device: Annotated[Optional[str], typer.Option(help="cuda, cuda:1 or cpu. (default: cuda if available)")] = None,
    throughput: Annotated[bool, typer.Option(help="Measure images/s of the student and each teacher architecture.")] = True,
    throughput_batch: Annotated[Optional[int], typer.Option(help="Batch for throughput. (default: 64 on CUDA, 4 on CPU)")] = None,
    images: Annotated[Optional[Path], typer.Option(help="The image folder, when it moved since the build. (default: the root recorded in the store)")] = None,
    sam: Annotated[bool, typer.Option(help="SAM mask IoU of the student as SAM's image encoder, where the store has a SAM teacher (the tiny preset's decoder is seeded; another needs --sam-checkpoint unless its weight file is still where the build found it, or the toy preset's in cache/toy/).")] = True,
    sam_checkpoint: Annotated[Optional[Path], typer.Option(help="The SAM teacher's checkpoint file (its prompt encoder and mask decoder), for the SAM metric. [default: the file the store was built from, if it is still there unchanged]")] = None,
    sam_images: Annotated[int, typer.Option(help="Held-out images of the SAM metric (a seeded subset when more).")] = 200,
):
    """Fidelity, kNN, zero-shot, dense-probe mIoU, SAM mask IoU and throughput of RUN's student vs its teachers, from STORE."""
    from .evaluate import EvalConfig
    from .evaluate import evaluate as run_evaluation

    sides = [v.strip() for v in (resolutions or "").split(",") if v.strip()]
    if not all(v.isdigit() for v in sides):
        raise RadioDistillError(f"--resolutions '{resolutions}': expected input sides separated by commas, e.g. 224,448")
    cfg = EvalConfig(store=store, run=run, out=out, masks=masks, instances=instances, max_bank=max_bank, knn_k=k, probe_images=probe_images,
                     probe_steps=probe_steps, pictures=pictures, resolution=resolution,
                     resolutions=tuple(int(v) for v in sides), batch_size=batch_size,
                     workers=workers, device=device, throughput=throughput, throughput_batch=throughput_batch,
                     images=images, sam=sam, sam_checkpoint=sam_checkpoint, sam_images=sam_images)
    report = run_evaluation(cfg)
    skipped = [f"{name}: {section['skipped']}" for name, section in report.items()
               if isinstance(section, dict) and "skipped" in section]
    skipped += [f"sam ground truth of {t}: {v['ground_truth']['skipped']}"
                for t, v in report["sam"].get("teachers", {}).items() if "skipped" in v.get("ground_truth", {})]
    pictures = [v for k, v in report["pictures"].items() if k != "skipped" and v]
    _stdout().print(f"wrote {out / 'report.md'}, report.json, {', '.join(pictures)}")
    for line in skipped:
        _stdout().print(f"[yellow]skipped[/] {line}", highlight=False)
