"""``busbench score``: predicted masks made by any tool, scored on a dataset's held-out test split.

The predictions are compared with the manifest's ground truth at each image's original size, with the metrics
``busbench test`` uses (:func:`busbench.metrics.per_image_batch`, ``eval.hd95_mode``), and written into the results
layout of a run, ``<output.root>/<experiment>/<dataset>/<name>/``:

* ``test/ensemble_per_image.csv`` (and the same table as ``test/fold0_per_image.csv``), columns of
  :data:`busbench.engine.evaluate.PER_IMAGE_COLUMNS`;
* ``summary.csv`` with the columns of a run's summary: one row ``fold=0`` and one ``fold=ensemble``, both the scores
  of the one set of predictions (``n_folds`` is 1 on the leaderboard), ``resolution=original`` and the manifest's
  SHA-256, so ``busbench aggregate`` refuses to rank it beside runs tested on another split;
* ``score.json``: where the predictions came from (folder, each file's SHA-256), the settings and the time.

So ``busbench aggregate``, ``busbench compare`` and ``busbench plot`` read it like any run.

**File names to sample ids.** Every file in ``--pred-dir`` (not its subfolders) ending in ``.png``, ``.bmp``,
``.tif`` or ``.tiff`` is a prediction; other files (nnU-Net's ``plans.json``, busbench predict's ``predictions.csv``
and ``_prob.npz``) are ignored. The file's stem, less ``--suffix`` when given (``--suffix _mask`` reads
``benign_0001_mask.png``), must equal either the sample id (``sample_id`` in the manifest, e.g. ``benign_0001``; what
``busbench export nnunet`` uses as case name, so nnU-Net's predictions need no renaming) or the stem of the sample's
original image file (e.g. ``benign (1)``, what ``busbench predict`` writes for the raw test images). ``<stem>_classes``
files beside a matched ``<stem>`` (busbench predict's multiclass class maps) are skipped.

**Mask values.** Any non-zero pixel is lesion: 0/255 and 0/1 binary masks and 0/1/2 class maps (nnU-Net with
``--labels classes``) all work. A file with more than three distinct values looks like a probability or grey image
and is refused; threshold it first.

Refused, each listed: test images without a prediction, predictions that match no test image (a development image,
or an unknown name), two files for one image, masks whose size differs from the image's, unreadable files.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from busbench.atomic import atomic_write_text
from busbench.config import Config, load_config
from busbench.data.decode import read_label_image, read_mask
from busbench.data.loader import load_dataset_rows, test_rows
from busbench.engine.evaluate import PER_IMAGE_COLUMNS, SUMMARY_COLUMNS, _Scorer, id_table
from busbench.engine.finetune import _sha256
from busbench.engine.runlog import LOG, ensure_console_logging, now
from busbench.engine.train import CONFIG_FILE
from busbench.errors import ConfigError, DataError
from busbench.locking import locked
from busbench.metrics import summarize

MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
PROVENANCE = "score.json"
_SHOWN = 20  # problems listed per kind


def _listing(kind: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN]) + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")
    return f"{kind} ({len(items)}): {shown}"


def match_files(
    pred_dir: Path, rows: pd.DataFrame, test: pd.DataFrame, suffix: str = ""
) -> tuple[dict[str, Path], list[str]]:
    """``sample_id -> prediction file`` for the test rows, and the problems found (see the module docstring)."""
    if not pred_dir.is_dir():
        raise DataError(f"--pred-dir {pred_dir} is not a folder")
    by_name: dict[str, str] = {sid: sid for sid in rows["sample_id"].astype(str)}
    for sid, image in zip(rows["sample_id"].astype(str), rows["image_path"].astype(str), strict=True):
        by_name.setdefault(Path(image).stem, sid)
    test_ids = set(test["sample_id"].astype(str))
    files = sorted(p for p in pred_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    stems = {p.stem for p in files if p.suffix.lower() in MASK_SUFFIXES}
    found: dict[str, Path] = {}
    duplicate, extra, dev, lossy = [], [], [], []
    for path in files:
        ext = path.suffix.lower()
        if ext in LOSSY_SUFFIXES:
            lossy.append(path.name)
            continue
        if ext not in MASK_SUFFIXES:
            continue
        stem = path.stem
        if stem.endswith("_classes") and stem[: -len("_classes")] in stems:
            continue
        if suffix:
            if not stem.endswith(suffix):
                extra.append(path.name)
                continue
            stem = stem[: -len(suffix)]
        sid = by_name.get(stem)
        if sid is None:
            extra.append(path.name)
        elif sid not in test_ids:
            dev.append(path.name)
        elif sid in found:
            duplicate.append(f"{found[sid].name} and {path.name} -> {sid}")
        else:
            found[sid] = path
    missing = sorted(test_ids - set(found))
    problems = []
    if missing:
        problems.append(_listing("test images without a prediction", missing))
    if extra:
        problems.append(_listing("files matching no image of the dataset", extra))
    if dev:
        problems.append(_listing("predictions of development-split images (not in the test split)", dev))
    if duplicate:
        problems.append(_listing("several files for one image", duplicate))
    if lossy:
        problems.append(_listing("JPEG files (lossy; save masks as PNG)", lossy))
    return found, problems


def read_prediction(path: Path, expected_hw: tuple[int, int]) -> np.ndarray:
    """A predicted mask as bool ``(H, W)``: non-zero is lesion. DataError for a wrong size or a non-mask image."""
    labels = read_label_image(path)
    if labels.shape != tuple(expected_hw):
        raise DataError(
            f"{path.name} is {labels.shape[0]}x{labels.shape[1]}, the image is {expected_hw[0]}x{expected_hw[1]}"
        )
    values = np.unique(labels)
    if values.size > 3:
        raise DataError(
            f"{path.name} holds {values.size} distinct values (a probability or grey image?); save a binary mask "
            "or a class map"
        )
    return labels > 0


def _summary_rows(cfg: Config, key: str, name: str, table: pd.DataFrame, manifest: str) -> list[dict[str, Any]]:
    s = summarize(table)
    row = {c: math.nan for c in SUMMARY_COLUMNS}
    row.update(
        {
            "experiment": cfg.experiment.name,
            "train_data": key,
            "dataset": key,
            "model": name,
            "n_test": s["n_images"],
            **s,
            "resolution": "original",
            "hd95_mode": cfg.eval.hd95_mode,
            "n_excluded": 0,
            "manifest_sha256": manifest,
            "config_hash": "",
        }
    )
    row.pop("n_images")
    return [{**row, "fold": "0"}, {**row, "fold": "ensemble"}]


def score_predictions(
    dataset: str,
    pred_dir: Path,
    name: str,
    experiment: str = "external",
    suffix: str = "",
    overrides: list[str] | None = None,
) -> Path:
    """Score the masks in ``pred_dir`` on ``dataset``'s test split; returns the written ``summary.csv``."""
    ensure_console_logging()
    pred_dir = Path(pred_dir)
    try:
        cfg = load_config(None, [f"data.dataset={dataset}", f"experiment.name={experiment}", *(overrides or [])])
    except ConfigError as exc:
        raise ConfigError(f"busbench score: {exc}") from None
    if not name or Path(name).name != name or name.startswith("."):
        raise ConfigError(f"--name {name!r} must be a plain folder name, e.g. --name nnunet_2d")
    out_dir = Path(cfg.output.root) / cfg.experiment.name / dataset / name
    if (out_dir / CONFIG_FILE).is_file():
        raise DataError(
            f"{out_dir} is a busbench training run; give the external predictions another --name or --experiment"
        )
    rows, info = load_dataset_rows(cfg, dataset)
    test = test_rows(rows)
    if len(test) == 0:
        raise DataError(f"the {dataset} manifest {info['manifest']} has no test rows; prepare it with --test-size > 0")
    found, problems = match_files(pred_dir, rows, test, suffix)
    if problems:
        raise DataError(f"{pred_dir} does not match the {dataset} test split: " + "; ".join(problems))

    scorer = _Scorer(cfg)
    bad = []
    for rec in test.to_dict("records"):
        path = found[str(rec["sample_id"])]
        gt = read_mask(rec["mask_path"])
        try:
            pred = read_prediction(path, gt.shape)
        except DataError as exc:
            bad.append(str(exc))
            continue
        scorer.add(pred, gt)
    if bad:
        raise DataError(f"{pred_dir}: " + _listing("unusable masks", bad))
    scorer.flush()
    ids = id_table(SimpleNamespace(rows=test), list(range(len(test))))
    table = pd.concat([ids, pd.DataFrame(scorer.rows)], axis=1)[list(PER_IMAGE_COLUMNS)]
    summary = pd.DataFrame(_summary_rows(cfg, dataset, name, table, str(info["manifest_sha256"])))
    summary = summary.reindex(columns=list(SUMMARY_COLUMNS))
    provenance = {
        "pred_dir": str(pred_dir.resolve()),
        "dataset": dataset,
        "name": name,
        "experiment": cfg.experiment.name,
        "manifest": info["manifest"],
        "manifest_sha256": info["manifest_sha256"],
        "resolution": "original",
        "hd95_mode": cfg.eval.hd95_mode,
        "suffix": suffix,
        "files": {sid: {"file": p.name, "sha256": _sha256(p)} for sid, p in sorted(found.items())},
        "time": now(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with locked(out_dir, wait=30.0):
        csv = table.to_csv(index=False, lineterminator="\n")
        atomic_write_text(out_dir / "test" / "ensemble_per_image.csv", csv)
        atomic_write_text(out_dir / "test" / "fold0_per_image.csv", csv)
        atomic_write_text(out_dir / PROVENANCE, json.dumps(provenance, indent=2) + "\n")
        path = out_dir / "summary.csv"
        atomic_write_text(path, summary.to_csv(index=False, lineterminator="\n"))
    LOG.info("scored %d %s test image(s) from %s", len(table), dataset, pred_dir)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, metavar="KEY", help="prepared dataset whose test split is scored")
    parser.add_argument(
        "--pred-dir", required=True, type=Path, metavar="DIR", help="folder of predicted masks, one per test image"
    )
    parser.add_argument(
        "--name", required=True, metavar="NAME", help="name of the method, the 'model' on the leaderboard"
    )
    parser.add_argument(
        "--experiment", default="external", metavar="EXP", help="results folder <output.root>/EXP (default: external)"
    )
    parser.add_argument(
        "--suffix", default="", metavar="S", help="strip S from file stems before matching, e.g. --suffix _mask"
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="e.g. --set data.data_root=DIR output.root=results eval.hd95_mode=max_directed",
    )


def run(args: argparse.Namespace) -> int:
    path = score_predictions(args.dataset, args.pred_dir, args.name, args.experiment, args.suffix, args.set)
    summary = pd.read_csv(path, dtype={"fold": str})
    shown = summary[summary["fold"] == "ensemble"][["dataset", "model", "n_test", "dice", "iou", "hd95"]]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {path} and {path.parent / 'test'}/")
    return 0
