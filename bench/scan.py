"""Build planning at ImageNet scale: `radio-cache build`'s folder scan and manifest fingerprint, files/s.

Before any Ray worker starts, the build lists the dataset (`scan_dataset`: the folder walk, sorted
ids, labels from the class folders) and fingerprints the manifest (`Manifest.fingerprint`, the
identity of the store's samples). This times both on a generated folder named like ImageNet's train
split: 1000 class folders `nXXXXXXXX/`, files `nXXXXXXXX_K.JPEG` with empty bodies (the planning
reads names, never pixels), generated once under <work>/scan-<files>/ and reused. The folder is in
the page cache after generation, so this is the warm-cache rate (a rerun of a build, or a scan
right after the copy); a cold network filesystem adds its per-directory latency.

Target: >= 20k files/s on the 2-core CPU.

    python bench/scan.py --files 200000 --json scan.json
    python bench/scan.py --quick                        # 2000 files
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

import common
from radio_distill.store.dataset import scan_dataset

CLASSES = 1000
FULL = dict(files=200_000, repeats=3)
QUICK = dict(files=2000, repeats=1)


def make_folder(work: Path, files: int) -> Path:
    """Generate (once) `files` empty files spread over CLASSES class folders, named like ImageNet's."""
    root = work / f"scan-{files}"
    done = root / "complete.txt"  # not an image name: the scan skips it
    if done.is_file():
        return root
    for c in range(CLASSES):
        wnid = f"n{1440764 + 7919 * c:08d}"  # distinct 8-digit WordNet-like ids
        folder = root / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(files // CLASSES + (c < files % CLASSES)):
            os.close(os.open(folder / f"{wnid}_{k}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))
    done.write_text(f"{files} files\n")
    return root


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--files", type=int, help="files in the generated folder")
    p.add_argument("--repeats", type=int, help="timed scans; the median is reported")
    args = common.parse(p, argv, full=FULL, quick=QUICK)

    root = make_folder(Path(args.work), args.files)
    scans, prints = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        manifest = scan_dataset(root)
        scans.append(time.perf_counter() - start)
        start = time.perf_counter()
        manifest.fingerprint()
        prints.append(time.perf_counter() - start)
    assert len(manifest) == args.files and len(manifest.classes) == min(CLASSES, args.files)
    scan_s, print_s = statistics.median(scans), statistics.median(prints)
    row = {"files": args.files, "classes": len(manifest.classes), "scan_s": round(scan_s, 3),
           "fingerprint_s": round(print_s, 3), "files_per_s": args.files / (scan_s + print_s)}
    payload = common.meta(torch.device("cpu"), __file__, args.argv, repeats=args.repeats, target_files_per_s=20_000)
    columns = [("files", "files", "d"), ("classes", "classes", "d"), ("scan_s", "scan s", ".3f"),
               ("fingerprint_s", "fingerprint s", ".3f"), ("files_per_s", "files/s", "n")]
    return common.report(payload, [row], columns, args.json_out,
                         title=f"Build planning: scan + fingerprint of an ImageNet-named folder; median of {args.repeats}")


if __name__ == "__main__":
    main()
