"""The CUDA-only branches, run once a GPU is lent (BENCHMARKS.md, "GPU paths"): one short script, ~5 min on one
H100 (estimated), ~3 more with 2+ GPUs. Each check prints one line, PASS / FAIL / SKIP with its numbers, and
they all go to `<out>/device_check.json`; a failing check does not stop the others.

    .venv/bin/python scripts/device_check.py --out /tmp/device_check            # on the GPU machine
    .venv/bin/python scripts/device_check.py --out /tmp/dc --device cpu         # the same sequence on the CPU, in
                                                                                # bf16 autocast (a smoke run of it)

Tolerances are those of the CPU tests of bf16 (tests/cache/test_gpu_paths.py, tests/train/test_gpu_paths.py).
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

from radio_distill.ops import AUTOCAST_ENV

ROOT = Path(__file__).resolve().parents[1]
BF16_COS_MEAN, BF16_COS_MIN, BF16_REL = 0.9995, 0.999, 0.02  # build targets, bf16 vs fp32
LOOP_LOSS_REL = 0.01  # per-teacher losses of the first 3 steps, bf16 vs fp32
RESUME_REL = 1e-4  # 8 steps vs 4 + --resume 4 on the GPU (atomics in some backward kernels: not bit-exact)
DDP_REL = 1e-3  # 2 NCCL processes vs 1 on the same global batch, bf16


@contextmanager
def autocast_mode(mode: str | None):
    before = os.environ.get(AUTOCAST_ENV)
    if mode is None:
        os.environ.pop(AUTOCAST_ENV, None)
    else:
        os.environ[AUTOCAST_ENV] = mode
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(AUTOCAST_ENV, None)
        else:
            os.environ[AUTOCAST_ENV] = before


def rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def max_rel(a: list[dict], b: list[dict], keys=None) -> float:
    return max(abs(rb[k] - ra[k]) / max(abs(ra[k]), 1e-12) for ra, rb in zip(a, b)
               for k in (keys or [k for k in ra if "/" in k]))


def decoded(store: Path, name: str, target: str):
    import zarr

    from radio_distill.store import codecs
    from radio_distill.store import layout as L

    root = zarr.open_group(store, mode="r")
    if L.target_array(name, target) not in root:
        return None
    scale = root[L.scale_array(name, target)][...] if L.scale_array(name, target) in root else None
    return codecs.decode(torch.from_numpy(root[L.target_array(name, target)][...]),
                         None if scale is None else torch.from_numpy(scale))


class Checks:
    def __init__(self, out: Path, device: str):
        self.out, self.device, self.results = out, device, {}
        self.gpus = torch.cuda.device_count() if device == "cuda" else 0
        self.mode = None if device == "cuda" else "bf16"  # the GPU's default; on the CPU the setting asks for it

    def run(self, name: str, fn, *, needs_gpus: int = 0) -> None:
        started = time.perf_counter()
        if needs_gpus and self.gpus < needs_gpus:
            result = {"status": "SKIP", "why": f"needs {needs_gpus} GPUs, this machine has {self.gpus}"}
        else:
            try:
                result = fn()
                result["status"] = "PASS" if result.pop("ok") else "FAIL"
            except Exception as e:  # noqa: BLE001 - reported, the other checks go on
                result = {"status": "FAIL", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - started, 1)
        self.results[name] = result
        shown = {k: v for k, v in result.items() if k not in ("status", "trace")}
        print(f"{result['status']:4} {name}: {json.dumps(shown, default=str)}", flush=True)
        (self.out / "device_check.json").write_text(json.dumps(self.results, indent=2, default=str))

    # 1. the build: one actor per GPU on its own GPU, bf16 autocast there, its targets within bf16 of fp32
    def build(self) -> dict:
        from radio_distill.cache.build import build_cache
        from radio_distill.cache.config import load_cache_config
        from radio_distill.cache.sample_data import make_sample_dataset

        self.images = make_sample_dataset(self.out / "data", images=64, size=96)
        self.store = self.out / "bf16.zarr"
        with autocast_mode(self.mode):
            report = build_cache(load_cache_config(data=self.images, out=self.store, teachers="tiny", views=2,
                                                   shard_size=8, workers=1), progress=False)
        with autocast_mode("fp32"):
            fp32 = build_cache(load_cache_config(data=self.images, out=self.out / "fp32.zarr", teachers="tiny", views=2,
                                                 shard_size=8, workers=1), progress=False)
        workers = report["workers"]
        want = ["cuda:0"] * max(self.gpus, 1) if self.device == "cuda" else ["cpu"]
        placed = (sorted(w["device"] for w in workers) == want and {w["autocast"] for w in workers} == {"bfloat16"}
                  and {w["autocast"] for w in fp32["workers"]} == {None}
                  and len({w["cuda_visible_devices"] for w in workers}) == len(workers))
        numbers, ok = {}, placed and report["complete"] and fp32["complete"]
        for name in ("clip", "dinov2", "sam"):
            for target in ("summary", "spatial"):
                ref, got = decoded(self.out / "fp32.zarr", name, target), decoded(self.store, name, target)
                if ref is None:
                    continue
                cos = torch.nn.functional.cosine_similarity(ref.flatten(0, -2), got.flatten(0, -2), dim=-1)
                rel = float((got - ref).norm() / ref.norm())
                numbers[f"{name}/{target}"] = [round(float(cos.mean()), 6), round(float(cos.min()), 6), round(rel, 5)]
                ok = ok and cos.mean() >= BF16_COS_MEAN and cos.min() >= BF16_COS_MIN and 0 < rel <= BF16_REL
        return {"ok": ok, "workers": workers, "cos_mean_min_rel": numbers, "images_per_s": report["images_per_s"]}

    # 1b. the calibration pass on the GPU (float64 moments there, codecs measured there): --fidelity 0.99
    def calibrate(self) -> dict:
        from radio_distill.cache.build import build_cache
        from radio_distill.cache.config import load_cache_config

        with autocast_mode(self.mode):
            report = build_cache(load_cache_config(data=self.images, out=self.out / "calibrated.zarr", teachers="tiny",
                                                   views=1, shard_size=8, workers=1, fidelity={None: 0.99}),
                                 progress=False)
        fidelity = {n: t["fidelity"] for n, t in report["teachers"].items()}
        means = [f["mean_cos"] for t in fidelity.values() for f in t.values()]
        return {"ok": report["complete"] and report["calibration"]["ran"] and min(means) >= 0.99 - 0.005,
                "fidelity": fidelity, "codecs": {n: t["storage"] for n, t in report["teachers"].items()}}

    def _config(self, out: Path, **kw):
        from radio_distill.train.config import TrainConfig

        values = dict(store=self.store, out=out, student="test_vit", steps=8, batch_size=16, resolution=64, lr=2e-3,
                      workers=2, log_every=1, checkpoint_every=1000, device=self.device, holdout=0.1)
        return TrainConfig(**{**values, **kw})

    # 2. training on the GPU: pinned batches, non-blocking copies, bf16 autocast, against fp32 on the same GPU
    def train(self) -> dict:
        from radio_distill.train.loop import train

        with autocast_mode(self.mode):  # on the GPU machine by default: no --device resolves to cuda
            train(self._config(self.out / "train_bf16", device=None if self.device == "cuda" else "cpu"), progress=False)
        with autocast_mode("fp32"):
            train(self._config(self.out / "train_fp32"), progress=False)
        a, b = rows(self.out / "train_fp32")[:3], rows(self.out / "train_bf16")[:3]
        rel = max_rel(a, b, [k for k in a[0] if "/" in k] + ["loss"])
        every = rows(self.out / "train_bf16")
        return {"ok": rel <= LOOP_LOSS_REL and every[-1]["loss"] < every[0]["loss"], "loss_rel_first_3": round(rel, 6),
                "loss_first_last": [every[0]["loss"], every[-1]["loss"]]}

    # 3. --resume on the GPU: the CUDA RNG state in the checkpoint, the optimizer state moved back to the GPU
    def resume(self) -> dict:
        from radio_distill.train.loop import train

        with autocast_mode(self.mode):
            train(self._config(self.out / "resume_part", stop_at=4), progress=False)
            train(self._config(self.out / "resume_part", resume=True), progress=False)
        a, b = rows(self.out / "train_bf16"), rows(self.out / "resume_part")
        rel = max_rel(a, b)
        return {"ok": len(b) == 8 and rel <= RESUME_REL, "loss_rel": rel}

    # 4. Ray Train: the probe on a GPU, one GPU per worker (Ray Train's NCCL group), the device Ray maps
    def ray_train(self) -> dict:
        from radio_distill.train.on_ray import train_on_ray

        workers = max(1, min(self.gpus, 2))
        with autocast_mode(self.mode):
            train_on_ray(self._config(self.out / "ray", device=self.device, workers=0), workers=workers)
        run = json.loads((self.out / "ray/run.json").read_text())
        got = rows(self.out / "ray")
        return {"ok": len(got) == 8 and run["config"]["device"].startswith(self.device), "workers": workers,
                "device_rank0": run["config"]["device"], "loss_last": got[-1]["loss"]}

    # 5. DDP over NCCL (2 GPUs): equal to one process on the same global batch; a loader failing on rank 1 only
    def ddp(self) -> dict:
        script = shutil.which("radio-train") or str(Path(sys.executable).parent / "radio-train")
        common = [str(self.store), "--student", "test_vit", "--steps", "4", "--batch-size", "16", "--resolution", "64",
                  "--workers", "2", "--log-every", "1", "--device", "cuda", "--holdout", "0.1"]
        subprocess.run([script, *common, "--out", str(self.out / "ddp1")], check=True, timeout=300)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               script, *common, "--out", str(self.out / "ddp2")], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode:
            return {"ok": False, "stderr": proc.stderr[-2000:]}
        rel = max_rel(rows(self.out / "ddp1"), rows(self.out / "ddp2"))
        return {"ok": rel <= DDP_REL, "loss_rel": rel}

    def ddp_rank1_failure(self) -> dict:
        """The CPU test's scenario (tests/train/test_distributed.py) over NCCL: both ranks end with rank 1's line."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the tests start a Ray of their own
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-k", "cuda",
                               str(ROOT / "tests/train/test_distributed.py")], capture_output=True, text=True,
                              timeout=400, cwd=ROOT, env=env)
        return {"ok": proc.returncode == 0, "tail": proc.stdout[-600:]}

    # 6. torch.compile of the SAM teacher (bench/teachers.py --compile sam times it at scale): same outputs as eager
    def compile_sam(self) -> dict:
        from radio_distill.cache.teachers import build_teacher, tiny_teachers
        from radio_distill.ops import autocast

        spec = next(t for t in tiny_teachers() if t.name == "sam")
        device = torch.device(self.device)
        teacher = build_teacher(spec, device=device)
        x = torch.randn(4, 3, teacher.resolution, teacher.resolution, device=device)
        with torch.inference_mode(), autocast_mode(self.mode), autocast(device):
            eager = teacher(x)[1]
            started = time.perf_counter()
            compiled = torch.compile(teacher)(x)[1]
            seconds = time.perf_counter() - started
        cos = torch.nn.functional.cosine_similarity(eager.flatten(0, -2).float(), compiled.flatten(0, -2).float(), dim=-1)
        return {"ok": float(cos.min()) >= 0.999, "cos_min": float(cos.min()), "compile_s": round(seconds, 1)}

    # 7. radio-eval on the GPU (bf16 features, throughput with CUDA syncs, SAM's decoder on the GPU) and the text tower
    def evaluate(self) -> dict:
        from radio_distill.cache.text import write_text_embeddings
        from radio_distill.evaluate import EvalConfig, evaluate

        with autocast_mode(self.mode):
            write_text_embeddings(self.store, device=self.device)
            report = evaluate(EvalConfig(store=self.store, run=self.out / "train_bf16", out=self.out / "eval",
                                         device=self.device, workers=2, throughput_seconds=0.5), progress=False)
        skipped = {k: v["skipped"] for k, v in report.items() if isinstance(v, dict) and "skipped" in v}
        return {"ok": not {"fidelity", "throughput", "zero_shot", "sam"} & set(skipped), "skipped": skipped,
                "throughput": report.get("throughput", {}).get("device")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run with --device cpu for a smoke run")
    import ray

    args.out.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    checks = Checks(args.out, args.device)
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'} x {max(checks.gpus, 1)}; "
          f"torch {torch.__version__}", flush=True)
    checks.run("build: actors per GPU, bf16 vs fp32 targets", checks.build)
    if not hasattr(checks, "store"):
        sys.exit("the build failed: nothing to train on")
    checks.run("calibration (--fidelity 0.99) on the device", checks.calibrate)
    checks.run("train: pinned, non-blocking, bf16 vs fp32", checks.train)
    checks.run("resume on the device", checks.resume)
    checks.run("ray train: probe, one GPU per worker", checks.ray_train)
    checks.run("ddp nccl 2 vs 1 process", checks.ddp, needs_gpus=2)
    checks.run("ddp nccl: a loader failing on rank 1", checks.ddp_rank1_failure, needs_gpus=2)
    checks.run("torch.compile of SAM", checks.compile_sam)
    checks.run("radio-eval and text tower", checks.evaluate)
    failed = [k for k, v in checks.results.items() if v["status"] == "FAIL"]
    print(f"{len(checks.results) - len(failed)} of {len(checks.results)} checks passed or skipped; "
          f"results in {args.out / 'device_check.json'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
