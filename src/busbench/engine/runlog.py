"""What a run leaves behind besides weights: per-epoch log, TensorBoard scalars and overlays, provenance.

* ``train_log.csv`` - one row per epoch (``epoch, lr, train_loss, val_dice, val_iou, val_hd95, seconds``), rewritten
  atomically from the history kept in the checkpoint, so a resumed run has exactly one row per epoch.
* ``tensorboard/`` - the same scalars plus a few validation overlays (grey image, ground truth in green, prediction
  in red); on resume, events after the resumed epoch are purged.
* ``run.json`` - provenance: busbench/Python/numpy/scikit-learn/OpenCV/torch/CUDA versions, git commit, device,
  manifest hashes, seeds, where each dataset's split came from (``data_split``: v1 or drawn, its seed, test size
  and folds, as the manifest's summary JSON records them, not as the run's config says), and one entry per session
  (start, end, status), so every number can be traced to the code and data that made it.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import busbench
from busbench.atomic import atomic_write_text
from busbench.data.manifest import DataRoots, library_versions, read_summary, split_provenance
from busbench.errors import BusbenchError

LOG = logging.getLogger("busbench")
TRAIN_LOG_COLUMNS = ("epoch", "lr", "train_loss", "val_dice", "val_iou", "val_hd95", "seconds")


def now() -> str:
    """Local time with offset, to the second (ISO 8601)."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def ensure_console_logging() -> None:
    """Show busbench's INFO messages on stderr when nothing else configured logging."""
    if not LOG.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(handler)
    if LOG.level == logging.NOTSET:
        LOG.setLevel(logging.INFO)


def write_train_log(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``train_log.csv`` from the epoch history (missing validation values are left empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TRAIN_LOG_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in TRAIN_LOG_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def git_commit(start: Path | None = None) -> str | None:
    """The commit of the source tree busbench runs from (``+dirty`` when it has changes), or None outside git."""
    folder = start or Path(busbench.__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha or None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware a result depends on."""
    info: dict[str, Any] = {
        "busbench_version": busbench.__version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "numpy": np.__version__,
        "scikit_learn": library_versions()["scikit-learn"],
        "opencv": library_versions()["opencv"],
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or None,
        "cpu_threads": torch.get_num_threads(),
    }
    return info


def data_split_provenance(datasets: list[str] | tuple[str, ...], data_root: Any) -> dict[str, dict[str, Any]]:
    """Per dataset key: split source ("v1" / "drawn, seed S"), seed, test size, folds and whether the copy was
    partial, read from ``<manifests>/<key>.json`` (the summary prepare wrote with the manifest)."""
    manifest_dir = DataRoots.resolve(data_root).manifest_dir
    out: dict[str, dict[str, Any]] = {}
    for key in datasets:
        summary = read_summary(manifest_dir / f"{key}.json")
        record = split_provenance(summary)
        out[key] = {
            name: record.get(name) for name in ("source", "seed", "test_size", "folds", "partial", "version")
        }
        out[key]["manifest_sha256"] = summary.get("manifest_sha256")
        out[key]["prepared_with"] = summary.get("versions")
    return out


def split_seed(splits: dict[str, dict[str, Any]]) -> Any:
    """The split seed of the data: one number when every dataset shares it, else one per dataset."""
    seeds = {key: info.get("seed") for key, info in splits.items()}
    values = set(seeds.values())
    return next(iter(values)) if len(values) == 1 else seeds


class RunRecord:
    """``run.json`` of one fold: static provenance plus a list of sessions, rewritten atomically on each change."""

    def __init__(self, path: Path, static: dict[str, Any], enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled  # False on the ranks of a multi-process run that do not write files
        previous: dict[str, Any] = {}
        if path.is_file():
            try:
                previous = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                previous = {}
        self.data: dict[str, Any] = {**static, "sessions": list(previous.get("sessions", []))}
        self.session: dict[str, Any] = {}

    def start(self, **fields: Any) -> None:
        # The caller holds the fold's lock, so a session still marked running died without cleaning up.
        for old in self.data["sessions"]:
            if old.get("status") == "running":
                old["status"] = "killed"
        self.session = {"start": now(), "end": None, "status": "running", **fields, "pid": os.getpid()}
        self.data["sessions"].append(self.session)
        self.data["status"] = "running"
        self.save()

    def finish(self, status: str, **fields: Any) -> None:
        """Close the session. Recording a failure is best effort: when run.json cannot be written (a full disk),
        the failure that ended the run is the error to report, not this one."""
        self.session.update({"end": now(), "status": status, **fields})
        self.data["status"] = status
        self.data.update(fields)
        if status == "completed":
            self.save()
            return
        try:
            self.save()
        except (OSError, BusbenchError) as exc:
            LOG.warning("could not record the %s session in %s: %s", status, self.path, exc)

    def save(self) -> None:
        if not self.enabled:
            return
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=False, default=str) + "\n")


def overlay(image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """RGB uint8 (3, H, W): grey image, ground truth tinted green, prediction tinted red (overlap yellow)."""
    grey = image.astype(np.float32)
    lo, hi = float(grey.min()), float(grey.max())
    grey = (grey - lo) / (hi - lo) if hi > lo else np.zeros_like(grey)
    rgb = np.repeat(grey[None] * 0.7, 3, axis=0)
    rgb[1][gt] = rgb[1][gt] * 0.5 + 0.5
    rgb[0][pred] = rgb[0][pred] * 0.5 + 0.5
    return (np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


class TensorBoardLog:
    """Thin wrapper that is a no-op when TensorBoard output is off."""

    def __init__(self, folder: Path, enabled: bool, purge_step: int | None = None) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if value is not None and np.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def overlays(self, images: list[np.ndarray], step: int) -> None:
        if self.writer is None or not images:
            return
        self.writer.add_images("val/overlay", np.stack(images), step, dataformats="NCHW")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
