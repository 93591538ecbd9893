"""``busbench predict``: lesion masks of new images from a trained run's fold ensemble.

The images go through exactly what ``busbench test`` does with the test split: decoded like the training data
(:func:`busbench.data.decode.read_image`: grey, RGB, RGBA, palette and 16-bit files), squared by the run's
``data.resize`` rule at ``data.image_size``, normalised by the dataset class, and passed through every selected fold
model; the ensemble is the mean of their probabilities (:func:`busbench.engine.evaluate.predict_batch`, the
evaluator's own code, ``eval.tta`` and multitask refinement included). The ensemble's lesion probability is mapped
back onto each image's own grid (:func:`busbench.data.geometry.restore`) and thresholded at the run's
``eval.threshold``, which is what ``busbench test --set eval.resolution=original`` scores.

Inputs (``--input``, any mix): image files (PNG, JPEG, BMP, TIFF), folders (searched recursively for those, hidden
files skipped) and text files (``.txt``/``.lst``) listing one path per line (relative paths are taken from the list's
folder; blank lines and ``#`` comments are ignored). Outputs in ``OUT``, named by each input's file stem:

======================  ==========================================================================================
``<stem>.png``          the 0/255 lesion mask at the image's own size
``<stem>_classes.png``  multiclass runs: the class map (0 background, 1 benign, 2 malignant)
``<stem>_prob.npz``     ``--save-probabilities``: ``lesion`` (float32, image size) and, per mode, ``classes``
                        (multiclass pixel probabilities, background first) or ``label`` (multitask class
                        probabilities, normal/benign/malignant)
``predictions.csv``     one row per predicted image: file, mask, height, width, lesion_pixels, max_prob, empty,
                        label (multitask runs; empty otherwise)
``predict.json``        provenance: the run, each checkpoint's SHA-256, the config hash, versions, device, times,
                        the inputs that failed
======================  ==========================================================================================

Bad inputs (a missing, empty or undecodable file, a folder without images, two inputs with one stem) are reported one
line each; every good image is still predicted, and the command then exits with status 1, listing the failures.
Every file is written atomically. An ``OUT`` that already holds files is refused unless ``--force`` is given, which
replaces files of the same names and leaves other files alone.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from busbench.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from busbench.config import Config
from busbench.data.decode import read_image, square_image
from busbench.data.geometry import restore
from busbench.data.loader import SegmentationDataset, make_loader
from busbench.engine import checkpoint as ckpt
from busbench.engine import tasks
from busbench.engine.evaluate import (
    _fold_checkpoints,
    _load_models,
    load_run_config,
    predict_batch,
    write_mask,
)
from busbench.engine.finetune import _sha256
from busbench.engine.inference import resolve_device
from busbench.engine.runlog import LOG, ensure_console_logging, environment, now
from busbench.errors import BusbenchError, ConfigError, DataError
from busbench.locking import locked

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LIST_SUFFIXES = (".txt", ".lst")
PREDICTIONS = "predictions.csv"
PROVENANCE = "predict.json"
PREDICTION_COLUMNS = ("file", "mask", "height", "width", "lesion_pixels", "max_prob", "empty", "label")


# --------------------------------------------------------------------------------------------------------------
# inputs


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _list_entries(path: Path) -> list[Path]:
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entry = Path(line).expanduser()
            entries.append(entry if entry.is_absolute() else path.parent / entry)
    return entries


def collect_inputs(paths: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """Image files named by ``paths`` (files, folders, lists of paths), and one line per input that is unusable.

    Files are kept in the order given (folders sorted); the same file named twice counts once. Inputs sharing a file
    stem would write the same outputs, so all of them are refused.
    """
    files: list[Path] = []
    failures: list[str] = []

    def add(path: Path, from_list: Path | None = None) -> None:
        where = f" (listed in {from_list})" if from_list else ""
        if path.is_dir():
            found = _images_in(path)
            if not found:
                failures.append(f"{path}{where}: folder holds no {'/'.join(IMAGE_SUFFIXES)} images")
            files.extend(found)
        elif not path.exists():
            failures.append(f"{path}{where}: does not exist")
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
        elif path.suffix.lower() in LIST_SUFFIXES and from_list is None:
            try:
                entries = _list_entries(path)
            except (OSError, UnicodeDecodeError) as exc:
                failures.append(f"{path}: list of paths cannot be read ({exc})")
                return
            if not entries:
                failures.append(f"{path}: list of paths is empty")
            for entry in entries:
                add(entry, from_list=path)
        else:
            failures.append(
                f"{path}{where}: not an image ({', '.join(IMAGE_SUFFIXES)}), a folder or a list of paths "
                f"({', '.join(LIST_SUFFIXES)})"
            )

    for p in paths:
        add(Path(p).expanduser())
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.resolve(), f)
    by_stem: dict[str, list[Path]] = {}
    for f in unique.values():
        by_stem.setdefault(f.stem, []).append(f)
    kept = []
    for stem, group in by_stem.items():
        if len(group) > 1:
            failures.append(
                f"stem {stem!r} is shared by {', '.join(map(str, group))}: their outputs would overwrite each other; "
                "rename one or predict them into different --out folders"
            )
        else:
            kept.append(group[0])
    return kept, failures


def _check_image(path: Path, channels: int) -> tuple[int, int]:
    """(height, width) of a decodable image file; DataError naming the file otherwise."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    image = read_image(path, channels)
    return int(image.shape[0]), int(image.shape[1])


class ImageFileDataset(SegmentationDataset):
    """Unlabelled image files as network inputs: decoded, squared and normalised like manifest rows.

    Only :meth:`pixels` differs from :class:`SegmentationDataset` (there is no mask; the class map is all
    background), so the network sees exactly what it sees for a test image.
    """

    def __init__(self, files: Sequence[Path], sizes: Sequence[tuple[int, int]], cfg: Config):
        rows = pd.DataFrame(
            {
                "sample_id": [f.stem for f in files],
                "dataset": "input",
                "label": "normal",
                "image_path": [str(f) for f in files],
                "mask_path": "",
                "height": [h for h, _ in sizes],
                "width": [w for _, w in sizes],
            }
        )
        data = cfg.data  # the geometry and normalisation the run was trained with; no augmentation
        super().__init__(rows, data.image_size, data.resize, data.channels, data.normalize, augment=None)

    def pixels(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rec = self._records[index]
        image = read_image(rec["image_path"], self.channels)
        if image.shape[:2] != (int(rec["height"]), int(rec["width"])):
            raise DataError(f"{rec['image_path']} changed while busbench predict was running; run it again")
        square, _ = square_image(image, self.image_size, self.resize)
        return square, np.zeros(square.shape[:2], dtype=np.uint8)


# --------------------------------------------------------------------------------------------------------------
# outputs


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise DataError("PNG encoding failed")
    return buf.tobytes()


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DataError(
            f"--out {out} already holds files; choose a new folder, or pass --force to replace the predictions in it"
        )


def _selected_folds(run_dir: Path, cfg: Config, folds: Sequence[str]) -> list[int]:
    if not folds or list(folds) == ["all"]:
        return list(range(cfg.data.folds))
    try:
        chosen = sorted({int(f) for f in folds})
    except ValueError:
        raise ConfigError(f"--folds {' '.join(folds)}: give 'all' or fold numbers, e.g. --folds 0 2") from None
    bad = [k for k in chosen if not 0 <= k < cfg.data.folds]
    if bad:
        raise ConfigError(
            f"--folds {' '.join(map(str, bad))}: {run_dir} has folds 0..{cfg.data.folds - 1} (data.folds)"
        )
    return chosen


def predict_images(
    run_dir: Path,
    inputs: Sequence[str | Path],
    out: Path,
    folds: Sequence[str] = ("all",),
    tta: bool = False,
    save_probabilities: bool = False,
    force: bool = False,
    overrides: Sequence[str] = (),
) -> tuple[Path, list[str]]:
    """Predict every usable input; returns ``predictions.csv`` and the failure lines (empty when all went well)."""
    ensure_console_logging()
    run_dir, out = Path(run_dir), Path(out)
    started, t0 = now(), time.perf_counter()
    cfg = load_run_config(run_dir, [*overrides, *(["eval.tta=true"] if tta else [])])
    chosen = _selected_folds(run_dir, cfg, folds)
    _check_out(out, force)

    files, failures = collect_inputs(inputs)
    usable, sizes = [], []
    for f in files:
        try:
            sizes.append(_check_image(f, cfg.data.channels))
            usable.append(f)
        except DataError as exc:
            failures.append(str(exc))
    for line in failures:
        LOG.error("%s", line)
    if not usable:
        raise DataError(f"no image to predict; {len(failures)} input(s) failed:\n  " + "\n  ".join(failures))

    device = resolve_device(cfg.train.device)
    with locked(run_dir, wait=30.0):
        checkpoints = _fold_checkpoints(run_dir, cfg, chosen)
        models, _ = _load_models(cfg, checkpoints, device)
        hashes = [{"fold": k, "path": str(path), "sha256": _sha256(path)} for k, path, _ in checkpoints]

    task = tasks.build_task(cfg)
    ds = ImageFileDataset(usable, sizes, cfg)
    loader = make_loader(ds, cfg.eval.batch_size, shuffle=False, seed=0, num_workers=cfg.data.num_workers)
    threshold = cfg.eval.threshold
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    LOG.info("predicting %d image(s) with %d fold model(s) of %s on %s", len(ds), len(models), run_dir, device)
    with tqdm(total=len(ds), disable=None, desc="predict", unit="img") as bar:
        for batch in loader:
            predicted = predict_batch(cfg, task, models, batch["image"], device)
            ens = predicted.lesion.shape[0] - 1  # the ensemble is the last source
            for j, i in enumerate(batch["index"].tolist()):
                geometry = ds.letterbox_info(i)

                def back(a: np.ndarray, geometry=geometry) -> np.ndarray:
                    return restore(a, geometry)

                prob = back(predicted.lesion[ens, j].numpy())
                mask = prob >= threshold
                extra = task.image_outputs(predicted, ens, j, threshold, back)
                stem = str(ds.rows.at[i, "sample_id"])
                write_mask(out / f"{stem}.png", mask)
                if "classes" in extra:
                    atomic_write_bytes(out / f"{stem}_classes.png", _png(extra["classes"]))
                if save_probabilities:
                    arrays = {"lesion": prob.astype(np.float32)}
                    if predicted.pixel is not None:
                        pixel = predicted.pixel[ens, j].numpy().transpose(1, 2, 0)
                        arrays["classes"] = back(np.ascontiguousarray(pixel)).astype(np.float32)
                    if predicted.image is not None:
                        arrays["label"] = predicted.image[ens, j].numpy().astype(np.float32)
                    _write_npz(out / f"{stem}_prob.npz", arrays)
                rows.append(
                    {
                        "file": str(ds.rows.at[i, "image_path"]),
                        "mask": f"{stem}.png",
                        "height": int(ds.rows.at[i, "height"]),
                        "width": int(ds.rows.at[i, "width"]),
                        "lesion_pixels": int(mask.sum()),
                        "max_prob": float(prob.max()),
                        "empty": not bool(mask.any()),
                        "label": extra.get("label", ""),
                    }
                )
            bar.update(len(batch["index"]))
    seconds = time.perf_counter() - t0
    table = pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS))
    path = out / PREDICTIONS
    atomic_write_text(path, table.to_csv(index=False, lineterminator="\n"))
    provenance = {
        "run": str(run_dir.resolve()),
        "experiment": cfg.experiment.name,
        "datasets": list(cfg.data.datasets),
        "model": cfg.model.name,
        "task": cfg.task.mode,
        "folds": chosen,
        "checkpoints": hashes,
        "config_hash": ckpt.training_hash(cfg),
        "preprocessing": {
            "image_size": cfg.data.image_size,
            "resize": cfg.data.resize,
            "channels": cfg.data.channels,
            "normalize": cfg.data.normalize,
        },
        "threshold": threshold,
        "tta": cfg.eval.tta,
        "n_images": len(rows),
        "failures": failures,
        "started": started,
        "finished": now(),
        "seconds": round(seconds, 3),
        "environment": environment(device),
    }
    atomic_write_text(out / PROVENANCE, json.dumps(provenance, indent=2) + "\n")
    LOG.info("%d image(s) in %.1f s (%.2f images/s)", len(rows), seconds, len(rows) / max(seconds, 1e-9))
    return path, failures


# --------------------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", required=True, type=Path, metavar="DIR", help="run folder written by busbench train"
    )
    parser.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="PATH",
        help="image files (PNG/JPEG/BMP/TIFF), folders searched for them, or .txt files listing paths",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="OUT", help="folder for the masks")
    parser.add_argument(
        "--folds",
        nargs="+",
        default=["all"],
        metavar="K",
        help="fold models to ensemble: 'all' (default) or fold numbers, e.g. --folds 0 2",
    )
    parser.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument(
        "--save-probabilities", action="store_true", help="also write <stem>_prob.npz (float32 probabilities)"
    )
    parser.add_argument("--force", action="store_true", help="write into an OUT that already holds files")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="inference overrides, e.g. --set train.device=cpu eval.batch_size=8",
    )


def run(args: argparse.Namespace) -> int:
    path, failures = predict_images(
        args.run,
        args.input,
        args.out,
        folds=args.folds,
        tta=args.tta,
        save_probabilities=args.save_probabilities,
        force=args.force,
        overrides=args.set,
    )
    n = len(pd.read_csv(path))
    print(f"wrote {n} mask(s), {path} and {path.parent / PROVENANCE}")
    if failures:
        raise BusbenchError(
            f"{len(failures)} input(s) could not be predicted:\n  " + "\n  ".join(failures)
        )
    return 0
