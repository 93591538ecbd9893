"""Loader throughput: images per second from the PNG files versus the preprocessed cache.

A synthetic prepared dataset of BUSI-like images (``--n`` RGB PNGs of about 500 x 600 pixels with speckle, derived
0/255 masks and class maps, a manifest and its summary) is written to a temporary data root. For every image size,
source (``png``: decode + resize every sample; ``cache``: read the uint8 memory map) and worker count, a
:func:`busbench.data.loader.make_loader` loader with the ``bus`` training augmentation runs one warm-up epoch (worker
start-up, page cache) and then ``--epochs`` timed epochs; the best timed epoch is reported, which is least disturbed
by other work on the machine. Every batch is made network-ready in the main process as the trainer does it
(:func:`busbench.data.loader.device_batch`, here on the CPU), so the rates include normalising and casting.
``former-float`` repeats the cache path with samples as the dataset used to return them (float32 image normalised
per sample, float32 mask, int64 class map): the comparison, under the same load, of what returning uint8 gained. The one-off cache build time is reported per size. ``--profile`` adds a cProfile
breakdown of one pass over the dataset, in-process, for both sources at the largest size.

Results are printed and written to ``bench/results.md`` under ``## loader`` (replacing an earlier ``## loader``
section, leaving other sections alone; see ``bench/_common.py``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from _common import heading, machine, write_section
from PIL import Image

from busbench.data.cache import ArrayCache, CacheSettings, ensure_cache
from busbench.data.loader import (
    SegmentationDataset,
    device_batch,
    load_dataset_rows,
    make_loader,
    normalize_images,
)
from busbench.data.manifest import summary_json, write_manifest
from busbench.data.synth import render_bus_image

KEY = "busi"
TARGET = 6.0  # cache ÷ PNG at the largest size, with every worker count
SOURCES = ("png", "cache", "former-float")


class FormerFloatSamples(SegmentationDataset):
    """The cache path with samples as the dataset returned them before it returned uint8: the image normalised on
    the host in float32, the mask float32, the class map int64 (1 MiB per 1-channel 256² sample instead of 192 KiB).
    """

    def __getitem__(self, item):
        out = super().__getitem__(item)
        out["image"] = normalize_images(out["image"][None], self.normalize)[0]
        out["mask"] = out["mask"].to(torch.float32)
        out["class_map"] = out["class_map"].to(torch.int64)
        return out


class _Cfg:
    """The two config sections load_dataset_rows reads."""

    def __init__(self, data_root: Path):
        self.data = type("Data", (), {"data_root": str(data_root)})()


def write_dataset(data_root: Path, n: int, seed: int) -> float:
    """BUSI-like prepared dataset under ``data_root``; returns the mean PNG size in kB."""
    rng = np.random.default_rng(seed)
    raw, derived = data_root / "raw", data_root / "derived"
    rows, sizes = [], []
    for i in range(n):
        h, w = int(rng.integers(440, 581)), int(rng.integers(520, 721))
        label = ("benign", "benign", "malignant", "normal")[i % 4]
        grey, mask = render_bus_image(rng, h, w, lesion=label != "normal", malignant=label == "malignant")
        sid = f"{KEY}_{i:04d}"
        image_rel = f"BUSI/{label}/{sid}.png"
        (raw / image_rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB").save(
            raw / image_rel
        )  # BUSI stores RGB
        sizes.append((raw / image_rel).stat().st_size)
        mask_rel, class_rel = f"{KEY}/masks/{sid}.png", f"{KEY}/class_masks/{sid}.png"
        for rel, values in (
            (mask_rel, mask * 255),
            (class_rel, mask * {"normal": 0, "benign": 1, "malignant": 2}[label]),
        ):
            (derived / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(values.astype(np.uint8), "L").save(derived / rel)
        test = i % 5 == 4
        rows.append(
            {
                "sample_id": sid,
                "dataset": KEY,
                "patient_id": sid,
                "group_id": sid,
                "label": label,
                "image_path": image_rel,
                "mask_path": mask_rel,
                "class_mask_path": class_rel,
                "height": h,
                "width": w,
                "split": "test" if test else "dev",
                "fold": -1 if test else i % 5,
            }
        )
    manifest = data_root / "manifests" / f"{KEY}.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    sha = write_manifest(manifest, rows)
    summary = {"raw_root": str(raw), "derived_root": str(derived), "manifest_sha256": sha}
    manifest.with_suffix(".json").write_text(summary_json(summary), encoding="utf-8")
    return float(np.mean(sizes)) / 1000


def throughput(ds: SegmentationDataset, batch_size: int, workers: int, epochs: int) -> float:
    """Images per second of the best of ``epochs`` timed epochs, after one warm-up epoch."""
    loader = make_loader(ds, batch_size, shuffle=True, seed=0, num_workers=workers)
    ready = isinstance(ds, FormerFloatSamples)  # already float32 on the host: nothing left to do

    def consume(batch) -> None:
        if not ready:
            device_batch(batch, ds.normalize, "cpu")

    for batch in loader:
        consume(batch)
    best = float("inf")
    for _ in range(epochs):
        start = time.perf_counter()
        for batch in loader:
            consume(batch)
        best = min(best, time.perf_counter() - start)
    del loader
    return len(ds) / best


def cpu_ms_per_sample(ds: SegmentationDataset, passes: int = 2) -> float:
    """CPU milliseconds per sample of an in-process pass (no DataLoader, no profiler), best of ``passes``.

    Process CPU time is insensitive to other jobs on the machine, unlike the wall-clock loader rates.
    """
    best = float("inf")
    for _ in range(passes):
        start = time.process_time()
        for i in range(len(ds)):
            ds[(i, i)]
        best = min(best, time.process_time() - start)
    return best / len(ds) * 1000


def profile_pass(ds: SegmentationDataset, top: int) -> tuple[str, float]:
    """cProfile of one in-process pass: the top functions by own time, and PNG decoding's share of the total."""
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    for i in range(len(ds)):
        ds[(i, i)]
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    decode = sum(v[2] for k, v in stats.stats.items() if "imdecode" in k[2])
    share = decode / stats.total_tt if stats.total_tt else 0.0
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if "ncalls" in ln)
    total = next((ln.strip() for ln in lines if "function calls" in ln), "")
    body = [re.sub(r"/\S*/(site-packages|src)/", "", ln) for ln in lines[start : start + top + 1]]
    return total + "\n" + "\n".join(body), share


def run(args: argparse.Namespace, data_root: Path) -> dict:
    t0 = time.perf_counter()
    kb = write_dataset(data_root, args.n, args.seed)
    print(
        f"wrote {args.n} images ({kb:.0f} kB per PNG on average) in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    rows, info = load_dataset_rows(_Cfg(data_root), KEY)
    results, builds, profiles = [], {}, {}
    cpu: dict[str, float] = {}
    for size in args.sizes:
        settings = CacheSettings(size, "letterbox", args.channels)
        t0 = time.perf_counter()
        folder = ensure_cache(rows, KEY, data_root, info["manifest_sha256"], settings)
        builds[size] = time.perf_counter() - t0
        cache = ArrayCache([folder])
        print(f"cache at {size}px built in {builds[size]:.2f} s", flush=True)
        for source in SOURCES:
            kind = FormerFloatSamples if source == "former-float" else SegmentationDataset
            ds = kind(
                rows,
                size,
                "letterbox",
                args.channels,
                "unit",
                augment="bus",
                cache=None if source == "png" else cache,
            )
            for workers in args.workers:
                ips = throughput(ds, args.batch_size, workers, args.epochs)
                results.append({"size": size, "source": source, "workers": workers, "ips": ips})
                print(f"{size:>4}px {source:>5} workers={workers}: {ips:8.1f} images/s", flush=True)
            if size == max(args.sizes) and source != "former-float":
                cpu[source] = cpu_ms_per_sample(ds)
                print(f"{size:>4}px {source:>5} in-process: {cpu[source]:.2f} CPU ms per sample", flush=True)
                if args.profile:
                    profiles[source] = profile_pass(ds, args.profile)
    return {"results": results, "builds": builds, "profiles": profiles, "kb": kb, "cpu": cpu}


def table(results: list[dict]) -> str:
    lines = [
        "| size | workers | PNG images/s | cache images/s | cache ÷ PNG | former float32 samples, cache images/s | ÷ PNG |",
        "|---|---|---|---|---|---|---|",
    ]
    ips = {(r["size"], r["workers"], r["source"]): r["ips"] for r in results}
    for size in sorted({r["size"] for r in results}):
        for workers in sorted({r["workers"] for r in results}):
            png, cached, former = (ips[(size, workers, s)] for s in SOURCES)
            lines.append(
                f"| {size} | {workers} | {png:.0f} | {cached:.0f} | {cached / png:.1f}× | {former:.0f} | {former / png:.1f}× |"
            )
    return "\n".join(lines)


def findings(run_out: dict, args: argparse.Namespace) -> list[str]:
    """What the numbers say, computed from them."""
    size = max(args.sizes)
    ips = {(r["size"], r["workers"], r["source"]): r["ips"] for r in run_out["results"]}
    ratios = {w: ips[(size, w, "cache")] / ips[(size, w, "png")] for w in args.workers}
    met = [w for w, r in ratios.items() if r >= TARGET]
    missed = [w for w, r in ratios.items() if r < TARGET]
    cpu = run_out["cpu"]
    lines = [
        f"- Target (cache ≥ {TARGET:g}× PNG at {size} px): met with {met or 'no'} workers"
        + (f", missed with {missed}" if missed else "")
        + f" (wall-clock ratios {', '.join(f'{w}: {r:.1f}×' for w, r in ratios.items())}).",
    ]
    if "png" in cpu and "cache" in cpu:
        lines.append(
            f"- Per sample in-process CPU time at {size} px: PNG {cpu['png']:.2f} ms, cache {cpu['cache']:.2f} ms "
            f"({cpu['png'] / cpu['cache']:.1f}×). This is the speed-up of the cache itself, independent of other jobs."
        )
    if "png" in run_out["profiles"]:
        share = run_out["profiles"]["png"][1]
        lines.append(
            f"- PNG path: decoding (`cv2.imdecode` of image, mask and class map) is {share:.0%} of the profiled time; "
            "resizing and colour conversion most of the rest. The cache path's remaining cost is the augmentation "
            "(albumentations' per-call bookkeeping, the affine warp) and building tensors."
        )
    new_kib = (args.channels + 2) * size * size / 2**10
    old_kib = (4 * args.channels + 4 + 8) * size * size / 2**10
    lines.append(
        "- With workers, each batch is collated into fresh shared memory by the worker and mapped by the main process. "
        f"A {args.channels}-channel sample at {size} px is {new_kib:.0f} KiB as the dataset returns it (uint8 image, "
        f"mask and class map), against {old_kib:.0f} KiB in the former float32 image, float32 mask and int64 class "
        "map (the last column, measured in the same run). Normalising and casting now happen once per batch on "
        "the device (here the CPU of the main process; on a GPU after a copy of a quarter of the bytes)."
    )
    lines.append(
        f"- Wall-clock rates were taken on a shared {os.cpu_count()}-core machine with other jobs running; repeated runs "
        "moved them by up to ±30 %. The CPU-time ratio above is the stable figure."
    )
    return lines


def section(run_out: dict, args: argparse.Namespace) -> str:
    build_text = ", ".join(f"{s} px: {t:.1f} s" for s, t in sorted(run_out["builds"].items()))
    libraries = [
        ("torch", "torch"),
        ("numpy", "numpy"),
        ("OpenCV", "cv2"),
        ("albumentations", "albumentations"),
    ]
    parts = [
        *heading("loader"),
        machine(libraries, notes=f"OpenCV {cv2.getNumThreads()} threads"),
        "",
        f"{args.n} synthetic BUSI-like images (RGB PNG, 440–580 × 520–720 px, {run_out['kb']:.0f} kB each on average) "
        f"with derived masks and class maps; {args.channels}-channel letterboxed input, `bus` augmentation, batch "
        f"{args.batch_size}, shuffled; best of {args.epochs} timed epochs after a warm-up epoch; torch intra-op threads 1 "
        f"in the main process (as in workers). One-off cache build ({build_text}).",
        "",
        table(run_out["results"]),
        "",
        *findings(run_out, args),
    ]
    for source, (text, _) in run_out["profiles"].items():
        parts += [
            "",
            f"cProfile (CPU time), one in-process pass, {source} source at {max(args.sizes)} px:",
            "",
        ]
        parts += ["```", text, "```"]
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="synthetic images")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 256])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--epochs", type=int, default=5, help="timed epochs per setting; the best is reported"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=int, default=8, help="rows of the cProfile breakdown (0: none)")
    parser.add_argument(
        "--data-root", type=Path, help="keep the synthetic dataset here instead of a temporary folder"
    )
    parser.add_argument("--no-write", action="store_true", help="print only, leave bench/results.md alone")
    args = parser.parse_args()
    # Collating a batch is a memory copy that gains nothing from intra-op threads, and on a busy machine OpenMP's
    # spin-waiting made it ten times slower in the main process; DataLoader workers run one thread anyway.
    torch.set_num_threads(1)
    temporary = args.data_root is None
    data_root = Path(tempfile.mkdtemp(prefix="busbench-loader-")) if temporary else args.data_root
    try:
        run_out = run(args, data_root)
    finally:
        if temporary:
            shutil.rmtree(data_root, ignore_errors=True)
    print()
    print(table(run_out["results"]))
    print("\n".join(findings(run_out, args)))
    if not args.no_write:
        write_section("loader", section(run_out, args))


if __name__ == "__main__":
    main()
