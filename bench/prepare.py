"""Benchmark ``busbench prepare``: wall time per dataset and per phase, on the real samples and on synthetic
BUSI-layout data of growing size.

For each case the raw data is prepared into a fresh data root and the time of every phase (scan, decode,
duplicates, splits, write) is read from prepare's debug log. Synthetic BUSI data (images 96-180 x 110-200 px, the
synthetic writer's size) is generated once per size with ``busbench.data.synth.synthesize`` and reused across
rounds. The growth factor from the second-largest to the largest synthetic size shows how prepare scales (the
duplicate search is the only quadratic part; the target is at most 5x for 4x the images).

Results are printed and written to ``bench/results.md`` under ``## prepare`` (replacing an earlier ``## prepare``
section, leaving other sections alone).

Run from the repository root with busbench installed:
    python bench/prepare.py [--real DIR] [--sizes 200 800 3200] [--rounds 1]

``--real`` (default: ``$BUSBENCH_REAL_DATA``) names a folder holding ``BUSI/``, ``BUSBRA/`` and ``BUS-UCLM/``
samples; without one, only the synthetic cases run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import sklearn

from busbench.atomic import atomic_write_text
from busbench.data.prepare import prepare
from busbench.data.synth import synthesize

RESULTS = Path(__file__).resolve().parent / "results.md"
HEADER = "# busbench benchmark results\n\nEach section is written by the script named in its heading (`bench/<name>.py`).\n"
REAL = {"busi": ("BUSI", 5), "busbra": ("BUSBRA", 5), "bus_uclm": ("BUS-UCLM", 3)}  # key -> (folder, folds)
PHASES = ("scan", "decode", "duplicates", "splits", "write")


class PhaseLog(logging.Handler):
    """Collects the phase timings prepare logs at debug level."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        phase = getattr(record, "phase", None)
        if phase is not None:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + float(record.seconds)
            self.cpu[phase] = self.cpu.get(phase, 0.0) + float(record.cpu_seconds)


def time_prepare(key: str, raw: Path, folds: int, rounds: int, workers: int | None) -> dict:
    """Best-of-rounds wall time of prepare on the raw folder ``raw`` (linked into a fresh data root each round)."""
    logger = logging.getLogger("busbench.data.prepare")
    logger.setLevel(logging.DEBUG)
    best: dict | None = None
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
            root = Path(tmp)
            (root / "raw").mkdir()
            (root / "raw" / raw.name).symlink_to(raw.resolve(), target_is_directory=True)
            handler = PhaseLog()
            logger.addHandler(handler)
            try:
                start, start_cpu = time.perf_counter(), time.process_time()
                prepare([key], data_root=root, folds=folds, progress=False, workers=workers)
                total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            finally:
                logger.removeHandler(handler)
            summary = json.loads((root / "manifests" / f"{key}.json").read_text())
        result = {
            "images": summary["counts"]["images"],
            "total": total,
            "cpu": total_cpu,
            **{p: handler.cpu.get(p, 0.0) for p in PHASES},
            "pairs": len(summary["duplicates"]["pairs"]),
            "groups": summary["groups"],
            "deviation": max(summary["balance"]["max_label_deviation"].values()),
            "test_fraction": summary["balance"]["test_fraction"],
        }
        if best is None or result["cpu"] < best["cpu"]:
            best = result
    assert best is not None
    return best


def format_row(name: str, r: dict) -> str:
    per = 1000 * r["cpu"] / r["images"]
    phases = " | ".join(f"{r[p]:.2f}" for p in PHASES)
    return (
        f"| {name} | {r['images']} | {r['total']:.2f} | {r['cpu']:.2f} | {per:.1f} | {phases} | {r['pairs']} | "
        f"{r['groups']} | "
        f"{r['test_fraction']:.3f} | {100 * r['deviation']:.1f} |"
    )


TABLE_HEAD = (
    "| case | images | wall s | CPU s | CPU ms/image | scan | decode | duplicates | splits | write | dup pairs "
    "| groups | test fraction | max label dev (pp) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--real",
        type=Path,
        default=os.environ.get("BUSBENCH_REAL_DATA") or None,
        help="folder holding BUSI/, BUSBRA/ and BUS-UCLM/ samples (default: $BUSBENCH_REAL_DATA)",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 800, 3200])
    parser.add_argument("--rounds", type=int, default=1, help="timing rounds per case; the best is kept")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: prepare's)")
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep synthetic data here (reused when present)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only, leave bench/results.md alone")
    args = parser.parse_args()

    rows: list[tuple[str, dict]] = []
    print(TABLE_HEAD)
    if args.real is None:
        print("(skipping the real datasets: pass --real DIR or set BUSBENCH_REAL_DATA)")
    for key, (folder, folds) in REAL.items() if args.real is not None else ():
        raw = Path(args.real) / folder
        if not raw.is_dir():
            print(f"(skipping {key}: {raw} not found)")
            continue
        r = time_prepare(key, raw, folds, args.rounds, args.workers)
        rows.append((f"real {key}", r))
        print(format_row(f"real {key}", r), flush=True)

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-synth-"))
    synth_seconds = {}
    try:
        for n in args.sizes:
            raw = work / f"n{n}" / "BUSI"
            if not raw.is_dir():
                start = time.perf_counter()
                synthesize("busi", raw, n=n, seed=0)
                synth_seconds[n] = time.perf_counter() - start
            r = time_prepare("busi", raw, 5, args.rounds, args.workers)
            rows.append((f"synthetic busi n={n}", r))
            print(format_row(f"synthetic busi n={n}", r), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    growth = ""
    if len(args.sizes) >= 2:
        (n0, (_, r0)), (n1, (_, r1)) = zip(args.sizes[-2:], rows[-2:], strict=True)
        growth = (
            f"Growth {n0}→{n1} images ({n1 / n0:.0f}× the images): CPU time {r1['cpu'] / r0['cpu']:.2f}× "
            f"(wall {r1['total'] / r0['total']:.2f}×); duplicates {r1['duplicates'] / max(r0['duplicates'], 1e-9):.2f}×, "
            f"splits {r1['splits'] / max(r0['splits'], 1e-9):.2f}×, decode {r1['decode'] / max(r0['decode'], 1e-9):.2f}×."
        )
        print(growth)
    if not args.no_write:
        write_section(section(rows, growth, synth_seconds, args))
        print(f"written to {RESULTS}")


def section(rows: list[tuple[str, dict]], growth: str, synth_seconds: dict, args: argparse.Namespace) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    sizes = " ".join(str(n) for n in args.sizes)
    synth_note = ", ".join(f"n={n}: {s:.0f} s" for n, s in synth_seconds.items())
    lines = [
        "## prepare",
        "",
        f"`python bench/prepare.py --sizes {sizes} --rounds {args.rounds}` — "
        f"{dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs (1-min load average {load:.1f} at the end: other "
        f"jobs shared the CPUs, so wall times are noisy and pessimistic; CPU times, summed over decoding threads, "
        f"are the stable measure); Python {platform.python_version()}, "
        f"numpy {np.__version__}, scikit-learn {sklearn.__version__}.",
        "",
        "Each case runs `prepare([key])` into a fresh data root (raw folder symlinked in), with default arguments "
        "(test size 0.2, seed 42; 5 folds, 3 for the 5-patient BUS-UCLM sample). Phase columns are CPU seconds from prepare's "
        "debug log; 'decode' includes reading the raw PNGs, merging masks, encoding the derived PNGs and the "
        "duplicate fingerprints. Synthetic cases are BUSI-layout images of 96-180 x 110-200 px"
        + (f" (generation, not timed in the table: {synth_note})." if synth_note else ".")
        + " 'max label dev' is the largest gap, in percentage points, between a label's share in the test split "
        "or any fold and its share in the whole dataset; the BUS-UCLM sample's 5 patients (whole groups) cannot "
        "be balanced closer.",
        "",
        TABLE_HEAD,
        *(format_row(name, r) for name, r in rows),
        "",
    ]
    if growth:
        lines += [growth + " Target: at most 5× for 800→3,200.", ""]
    return "\n".join(lines)


def write_section(text: str) -> None:
    """Put ``text`` in place of the old ``## prepare`` section of results.md (or append it), keep the rest."""
    current = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else HEADER
    pattern = re.compile(r"^## prepare\n.*?(?=^## |\Z)", flags=re.DOTALL | re.MULTILINE)
    if pattern.search(current):
        updated = pattern.sub(lambda _: text + "\n", current, count=1)
    else:
        updated = current.rstrip("\n") + "\n\n" + text
    atomic_write_text(RESULTS, updated.rstrip("\n") + "\n")


if __name__ == "__main__":
    main()
