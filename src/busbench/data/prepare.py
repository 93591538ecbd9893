"""``busbench prepare``: raw datasets -> derived masks, manifest CSV and summary JSON.

For each dataset key the adapter lists and decodes the raw samples; every image gets a binary lesion mask (0/255
PNG, ``<derived_root>/<key>/<sample_id>.png``) and a class map (0 background / 1 benign / 2 malignant,
``<sample_id>_classes.png``). Near-duplicates and shared patients are linked into groups, the held-out test split
and the cross-validation folds are drawn over whole groups, and the result is written as ``<out>/<key>.csv`` plus
``<out>/<key>.json``.

All-or-nothing: every dataset is read, decoded and checked before anything is written; derived masks are written
into a hidden temporary folder that replaces ``<derived_root>/<key>`` in one rename, and manifests are written
atomically. A DataError therefore leaves the data root exactly as it was. Raw files are only ever read.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from busbench import __version__
from busbench.atomic import atomic_write_bytes, atomic_write_text, replace_dir, staging_dir
from busbench.data.adapters import LABELS, Adapter, RawSample, get_adapter
from busbench.data.adapters.base import check_sample_id, check_utf8_path
from busbench.data.duplicates import (
    Signature,
    find_duplicates,
    group_samples,
    image_signature,
    label_conflicts,
    mixed_label_groups,
)
from busbench.data.manifest import (
    DataRoots,
    add_root_arguments,
    library_versions,
    manifest_bytes,
    relative_posix,
    sha256_bytes,
    summary_json,
    validate_manifest,
)
from busbench.data.splits import (
    RELEASE_NAMES,
    ReferenceCheck,
    ReferenceSplit,
    SplitResult,
    assign_splits,
    compare_with_reference,
    documented_count_line,
    label_deviation,
    reference_keys,
    reference_split,
)
from busbench.errors import DataError

MASK_SUFFIX = ".png"
CLASS_SUFFIX = "_classes.png"
PARALLEL_MIN = 32  # below this many samples a thread pool costs more than it saves
SPLIT_CHOICES = ("v1", "new")
DRAW_DEFAULTS: dict[str, Any] = {"test_size": 0.2, "folds": 5, "seed": 42}

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _phase(key: str, phase: str) -> Iterator[None]:
    """Log how long a phase took, wall and CPU (debug level; ``extra`` carries the numbers for benchmarks)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    yield
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    log.debug(
        "%s: %s took %.2f s (%.2f s CPU)",
        key,
        phase,
        seconds,
        cpu,
        extra={"dataset": key, "phase": phase, "seconds": seconds, "cpu_seconds": cpu},
    )


@dataclass
class _Decoded:
    """What prepare keeps of one decoded sample: sizes, encoded derived PNGs, fingerprint and notes."""

    height: int
    width: int
    mask_png: bytes
    class_png: bytes
    signature: Signature
    notes: list[str]


@dataclass(frozen=True)
class SplitRequest:
    """What the user asked for: ``splits`` None (v1 where it applies, else drawn), "v1" or "new"; the drawing
    settings; which of them were given explicitly; whether a partial copy of a release is accepted."""

    splits: str | None = None
    test_size: float = DRAW_DEFAULTS["test_size"]
    folds: int = DRAW_DEFAULTS["folds"]
    seed: int = DRAW_DEFAULTS["seed"]
    explicit: tuple[str, ...] = ()
    allow_partial: bool = False


@dataclass
class _SplitPlan:
    """How one dataset gets its split: from a reference file or drawn, and the line that says so."""

    reference: ReferenceSplit | None
    check: ReferenceCheck | None
    use_reference: bool
    statement: str
    status: str  # complete | partial | not the release | no reference
    warnings: list[str] = field(default_factory=list)


@dataclass
class PreparedDataset:
    """One dataset fully prepared in memory, ready to be written."""

    key: str
    manifest: bytes
    summary: dict[str, Any]
    derived: dict[str, bytes] = field(repr=False)  # file name under <derived_root>/<key>/ -> PNG bytes
    statement: str = ""  # where the split came from, in one line
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------- decode


def _encode_png(array: np.ndarray, what: str) -> bytes:
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise DataError(f"could not encode {what} as PNG")
    return buf.tobytes()


def _decode_sample(adapter: Adapter, sample: RawSample) -> _Decoded:
    """Decode one sample through its adapter and check what the manifest and loaders rely on."""
    decoded = adapter.decode(sample)
    image, mask, class_map = decoded.image, decoded.mask, decoded.class_map
    source = sample.mask_paths[0] if sample.mask_paths else sample.image_path
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise DataError(
            f"{sample.image_path}: decoded image is {image.dtype} {image.shape}, expected uint8 (H, W[, 3])"
        )
    h, w = image.shape[:2]
    if mask.shape != (h, w) or class_map.shape != (h, w):
        raise DataError(
            f"{source}: mask is {mask.shape[0]}x{mask.shape[1]} but image {sample.image_path.name} is {h}x{w}; "
            "replace the mask with one of the image's size"
        )
    mask = mask.astype(bool, copy=False)
    if class_map.dtype != np.uint8 or int(class_map.max(initial=0)) > 2:
        raise DataError(f"{source}: class map holds values other than 0/1/2 for sample {sample.sample_id}")
    if not np.array_equal(class_map > 0, mask):
        raise DataError(f"{source}: class map and lesion mask disagree for sample {sample.sample_id}")
    return _Decoded(
        height=h,
        width=w,
        mask_png=_encode_png(mask.astype(np.uint8) * 255, f"mask of {sample.sample_id}"),
        class_png=_encode_png(class_map, f"class map of {sample.sample_id}"),
        signature=image_signature(image),
        notes=[str(n) for n in decoded.notes],
    )


def _decode_all(
    adapter: Adapter, samples: Sequence[RawSample], workers: int, progress: bool
) -> list[_Decoded]:
    """Decode in input order; OpenCV and zlib release the GIL, so threads use both cores without pickling."""
    bar = tqdm(
        total=len(samples), desc=f"decode {adapter.key}", unit="img", disable=None if progress else True
    )

    def one(sample: RawSample) -> _Decoded:
        result = _decode_sample(adapter, sample)
        bar.update(1)
        return result

    try:
        if workers <= 1 or len(samples) < PARALLEL_MIN:
            return [one(s) for s in samples]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results: Iterator[_Decoded] = pool.map(one, samples)
            try:
                return list(results)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------------- prepare


def _raw_relative(path: Path, dataset_dir: Path, raw_root: Path, key: str) -> str:
    """Image path relative to the raw root, also when the dataset folder is a symlink the adapter resolved."""
    try:
        return relative_posix(path, raw_root, f"{key}: image")
    except DataError:
        inner = relative_posix(Path(path).resolve(), Path(dataset_dir).resolve(), f"{key}: image")
        outer = relative_posix(dataset_dir, raw_root, f"{key}: dataset folder")
        return f"{outer}/{inner}"


def _count(values: Sequence[Any]) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted(Counter(str(x) for x in values).items())}


def _drawn(request: SplitRequest) -> str:
    return (
        f"drawn, seed {request.seed} (test size {request.test_size:g}, {request.folds} folds, grouped by patient "
        "and near-duplicates)"
    )


def _file_facts(sample: RawSample) -> tuple[str, tuple[int, int]]:
    """SHA-256 of the raw image file and its pixel size from the header ((0, 0) if unreadable; decoding reports
    that file later), without decoding the pixels."""
    path = Path(sample.image_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError):
        height = width = 0
    return digest, (height, width)


def _plan_split(
    key: str,
    request: SplitRequest,
    samples: Sequence[RawSample],
    facts: Sequence[tuple[str, tuple[int, int]]],
    excluded: Sequence[str],
    official_folds: bool,
) -> _SplitPlan:
    """Decide between the shipped reference split and a drawn one; check the files against the reference.

    Refuses (DataError) a copy that is not the release a reference split was made for: images missing (unless
    ``allow_partial``), images the release does not hold, or labels/patients that differ.
    """
    reference = reference_split(key)
    name = RELEASE_NAMES.get(key, key)
    if reference is None:
        if request.splits == "v1":
            raise DataError(
                f"{key}: busbench has no v1 split for {key} (it has one for {', '.join(reference_keys())}); "
                "use --splits new to draw one"
            )
        warnings = [line] if (line := documented_count_line(key, [s.label for s in samples])) else []
        statement = f"{_drawn(request)}; busbench has no reference split for {key}"
        return _SplitPlan(None, None, False, statement, "no reference", warnings)
    check = compare_with_reference(
        reference,
        [s.sample_id for s in samples],
        [s.label for s in samples],
        [s.patient_id for s in samples],
        [digest for digest, _ in facts],
        [size for _, size in facts],
        excluded,
    )
    if request.splits == "new":
        warnings = []
        if check.is_release and (check.missing or check.extra or check.changed or check.mismatched):
            warnings.append(
                f"{key}: compared with the {name} public release: {len(check.missing)} missing, "
                f"{len(check.extra)} not in it, {len(check.changed)} with other bytes (listed in {key}.json)"
            )
        status = ("partial" if check.partial else "complete") if check.is_release else "not the release"
        statement = f"{_drawn(request)}, as --splits new asks"
        return _SplitPlan(reference, check, False, statement, status, warnings)
    if request.splits is None and not check.is_release:
        return _SplitPlan(
            reference,
            check,
            False,
            f"{_drawn(request)}; these files are not the {name} public release that the v1 split covers (none of "
            f"the {len(samples)} images has a released file's bytes or pixel size, as with synthetic data); "
            "pass --splits v1 to use the v1 split anyway",
            "not the release",
        )
    problems = []
    if check.mismatched:
        problems.append(
            f"{len(check.mismatched)} image(s) differ from the v1 split's labels or patients "
            f"({'; '.join(check.mismatched[:3])})"
        )
    if check.extra:
        problems.append(
            f"{len(check.extra)} image(s) on disk are not in the {name} public release: "
            f"{', '.join(check.extra[:5])}{' ...' if len(check.extra) > 5 else ''}; remove them, or pass "
            "--splits new to draw a split over what is on disk"
        )
    given = [o for o in ("seed", "test_size", "folds") if o in request.explicit]
    given = [o for o in given if getattr(request, o) != reference.settings[o]]
    if given:
        problems.append(
            f"{', '.join('--' + o.replace('_', '-') for o in given)} apply to drawn splits, and the v1 split "
            f"has seed {reference.settings['seed']}, test size {reference.settings['test_size']:g} and "
            f"{reference.settings['folds']} folds; add --splits new to draw a split with them"
        )
    if official_folds:
        problems.append("--official-folds draws a new split; add --splits new to use it")
    if problems:
        raise DataError(f"{key}: " + "; ".join(problems))
    if check.missing and not request.allow_partial:
        raise DataError(
            f"{check.missing_line()}; re-download the dataset, or pass --allow-partial to prepare the "
            f"{len(check.present)} present images with their v1 split"
        )
    warnings = []
    if check.changed:
        warnings.append(
            f"{key}: {len(check.changed)} of {len(check.present)} images differ in bytes from the {name} public "
            f"release (listed under reference.changed in {key}.json); they keep their v1 split"
        )
    statement = f"v1 (the {name} public release's reference split"
    if check.missing or check.excluded:
        statement += f", partial: {len(check.present)} of {len(reference.rows)} images present"
        if check.excluded:
            statement += f", {len(check.excluded)} left out by adapter options"
    statement += ")"
    if check.missing:
        warnings.append(f"partial copy: {check.missing_line()}")
    status = "partial" if check.missing or check.excluded else "complete"
    return _SplitPlan(reference, check, True, statement, status, warnings)


def _reference_assignment(
    reference: ReferenceSplit, ids: Sequence[str]
) -> tuple[dict[str, str], SplitResult]:
    """Group, split and fold of each id, as the reference file has them."""
    rows = reference.rows.loc[list(ids)]
    group_of = dict(zip(ids, rows["group_id"].astype(str), strict=True))
    split = SplitResult(split=rows["split"].astype(str).to_numpy(), fold=rows["fold"].astype(int).to_numpy())
    return group_of, split


def _prepare_one(
    adapter: Adapter,
    roots: DataRoots,
    *,
    request: SplitRequest,
    official_folds: bool,
    workers: int,
    progress: bool,
) -> PreparedDataset:
    key = adapter.key
    with _phase(key, "scan"):
        dataset_dir = adapter.locate(roots.raw_root)
        samples = sorted(adapter.scan(dataset_dir), key=lambda s: s.sample_id)
    if not samples:
        raise DataError(
            f"{key}: no images found in {dataset_dir}; check that the dataset was unpacked completely"
        )
    seen: set[str] = set()
    for s in samples:
        check_sample_id(s.sample_id, s.image_path, "rename the file, or give the adapter other sample ids")
        if s.sample_id in seen:
            raise DataError(f"{s.image_path}: sample id {s.sample_id!r} occurs twice in {dataset_dir}")
        seen.add(s.sample_id)
        if s.label not in LABELS:
            raise DataError(f"{s.image_path}: label {s.label!r} is not one of {', '.join(LABELS)}")
    image_paths = [_raw_relative(s.image_path, dataset_dir, roots.raw_root, key) for s in samples]
    if official_folds and all(s.official_fold is None for s in samples):
        raise DataError(
            f"{key}: --official-folds needs a dataset with an official fold file (busbra); {key} has none"
        )

    # The files are checked against a reference split before the slower decoding, so a refusal comes at once.
    with _phase(key, "reference"):
        if workers > 1 and len(samples) >= PARALLEL_MIN:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                facts = list(pool.map(_file_facts, samples))
        else:
            facts = [_file_facts(s) for s in samples]
    plan = _plan_split(key, request, samples, facts, sorted(adapter.excluded), official_folds)

    with _phase(key, "decode"):
        decoded = _decode_all(adapter, samples, workers, progress)

    ids = [s.sample_id for s in samples]
    labels = {s.sample_id: s.label for s in samples}
    with _phase(key, "duplicates"):
        pairs = find_duplicates(ids, [d.signature for d in decoded])
        group_of = group_samples(ids, [s.patient_id for s in samples], pairs)
    if plan.use_reference and plan.reference is not None:
        group_of, result = _reference_assignment(plan.reference, ids)
        settings = plan.reference.settings
        test_size, folds, seed = settings["test_size"], settings["folds"], settings["seed"]
    else:
        test_size, folds, seed = request.test_size, request.folds, request.seed
        with _phase(key, "splits"):
            result = assign_splits(
                ids,
                [s.label for s in samples],
                [group_of[i] for i in ids],
                test_size=test_size,
                folds=folds,
                seed=seed,
                official_folds=[s.official_fold for s in samples] if official_folds else None,
                dataset=key,
            )
    conflicts = label_conflicts(pairs, labels)
    mixed = mixed_label_groups(group_of, labels)

    rows = []
    derived: dict[str, bytes] = {}
    for k, (sample, dec) in enumerate(zip(samples, decoded, strict=True)):
        mask_name = sample.sample_id + MASK_SUFFIX
        class_name = sample.sample_id + CLASS_SUFFIX
        derived[mask_name] = dec.mask_png
        derived[class_name] = dec.class_png
        row: dict[str, Any] = {
            "sample_id": sample.sample_id,
            "dataset": key,
            "patient_id": sample.patient_id,
            "group_id": group_of[sample.sample_id],
            "label": sample.label,
            "image_path": image_paths[k],
            "mask_path": f"{key}/{mask_name}",
            "class_mask_path": f"{key}/{class_name}",
            "height": dec.height,
            "width": dec.width,
            "split": str(result.split[k]),
            "fold": int(result.fold[k]),
        }
        for meta_key, value in sorted(sample.meta.items()):
            row[f"meta_{meta_key}"] = "" if value is None else str(value)
        rows.append(row)
    data = manifest_bytes(rows)
    # Read back what was built, so a manifest prepare writes always passes read_manifest.
    validate_manifest(
        pd.DataFrame(rows).astype(str), f"{key}.csv (being built)", fold_gaps=plan.status == "partial"
    )

    notes = [
        n if n.startswith(s.sample_id) else f"{s.sample_id}: {n}"
        for s, d in zip(samples, decoded, strict=True)
        for n in d.notes
    ]
    summary = _summary(
        key,
        rows,
        roots=roots,
        dataset_dir=dataset_dir,
        manifest_sha256=sha256_bytes(data),
        seed=seed,
        test_size=test_size,
        folds=folds,
        official_folds=official_folds,
        options=adapter.options(),
        excluded=dict(sorted(adapter.excluded.items())),
        pairs=[p.as_dict() for p in pairs],
        conflicts=[p.as_dict() for p in conflicts],
        mixed=mixed,
        notes=result.notes + notes,
        plan=plan,
    )
    return PreparedDataset(
        key=key,
        manifest=data,
        summary=summary,
        derived=derived,
        statement=plan.statement,
        warnings=plan.warnings,
    )


def _splits_record(plan: _SplitPlan, seed: int, test_size: float, folds: int) -> dict[str, Any]:
    """``splits`` of the summary: the source ("v1" / "drawn, seed S"), its settings, and whether it is partial."""
    partial = plan.use_reference and plan.status == "partial"
    return {
        "source": "v1" if plan.use_reference else f"drawn, seed {seed}",
        "version": plan.reference.version if plan.use_reference and plan.reference else None,
        "file": plan.reference.file if plan.use_reference and plan.reference else None,
        "seed": seed,
        "test_size": test_size,
        "folds": folds,
        "partial": partial,
        "statement": plan.statement,
    }


def _reference_record(plan: _SplitPlan) -> dict[str, Any]:
    """``reference`` of the summary: how the files compare with the release's reference split."""
    return plan.check.as_dict(plan.status) if plan.check else {"status": plan.status}


def _summary(key: str, rows: list[dict[str, Any]], **info: Any) -> dict[str, Any]:
    labels = np.array([r["label"] for r in rows])
    split = np.array([r["split"] for r in rows])
    fold = np.array([r["fold"] for r in rows])
    k = info["folds"]
    linked = {p["a"] for p in info["pairs"]} | {p["b"] for p in info["pairs"]}
    dup_groups = {r["group_id"] for r in rows if r["sample_id"] in linked}
    roots: DataRoots = info["roots"]
    return {
        "dataset": key,
        "busbench_version": __version__,
        "manifest": f"{key}.csv",
        "manifest_sha256": info["manifest_sha256"],
        "raw_root": os.fspath(roots.raw_root.absolute()),
        "derived_root": os.fspath(roots.derived_root.absolute()),
        "dataset_dir": relative_posix(info["dataset_dir"], roots.raw_root, "dataset folder")
        if info["dataset_dir"] != roots.raw_root
        else ".",
        "seed": info["seed"],
        "test_size": info["test_size"],
        "folds": k,
        "official_folds": info["official_folds"],
        "splits": _splits_record(info["plan"], info["seed"], info["test_size"], k),
        "reference": _reference_record(info["plan"]),
        "versions": library_versions(),
        "adapter_options": {
            str(name): value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
            for name, value in sorted(info["options"].items())
        },
        "counts": {
            "images": len(rows),
            "label": _count(labels),
            "split": _count(split),
            "fold": {str(f): int((fold == f).sum()) for f in range(k)},
            "split_label": {s: _count(labels[split == s]) for s in ("dev", "test")},
            "fold_label": {str(f): _count(labels[fold == f]) for f in range(k)},
        },
        "patients": len({r["patient_id"] for r in rows}),
        "groups": len({r["group_id"] for r in rows}),
        "balance": {
            "test_fraction": round(float((split == "test").mean()), 4),
            "max_label_deviation": {
                "test": round(label_deviation(labels, split == "test"), 4),
                **{f"fold_{f}": round(label_deviation(labels, fold == f), 4) for f in range(k)},
            },
        },
        "duplicates": {
            "pairs": info["pairs"],
            "duplicate_pairs": sum(p["kind"] == "duplicate" for p in info["pairs"]),
            "near_pairs": sum(p["kind"] == "near" for p in info["pairs"]),
            "groups_with_duplicates": len(dup_groups),
            "label_conflicts": info["conflicts"],
            "mixed_label_groups": info["mixed"],
        },
        "excluded": info["excluded"],
        "notes": info["notes"],
    }


# ------------------------------------------------------------------------------------------------------ write


def _check_roots(roots: DataRoots) -> None:
    raw = os.path.normpath(os.path.abspath(roots.raw_root))
    for name, path in (("derived root", roots.derived_root), ("manifest folder", roots.manifest_dir)):
        other = os.path.normpath(os.path.abspath(path))
        if os.path.commonpath([raw, other]) in (raw, other):
            raise DataError(
                f"the {name} {path} overlaps the raw root {roots.raw_root}; raw data is read-only, so "
                "choose separate folders (--data-root/--out)"
            )


def _write(prepared: Sequence[PreparedDataset], roots: DataRoots) -> list[Path]:
    """Write derived folders (each swapped in by one rename), then manifests and summaries atomically."""
    summaries = {item.key: summary_json(item.summary) for item in prepared}  # can fail: do it before writing
    created_root = not roots.derived_root.exists()
    staged: list[tuple[Path, Path]] = []
    try:
        roots.derived_root.mkdir(parents=True, exist_ok=True)
        for item in prepared:
            final = roots.derived_root / item.key
            tmp = staging_dir(final)
            staged.append((tmp, final))
            for name, data in sorted(item.derived.items()):
                (tmp / name).write_bytes(data)
        for tmp, final in staged:
            replace_dir(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            if tmp.exists():
                shutil.rmtree(tmp)
        if created_root and roots.derived_root.is_dir() and not any(roots.derived_root.iterdir()):
            roots.derived_root.rmdir()
        raise
    paths = []
    for item in prepared:
        manifest = roots.manifest_dir / f"{item.key}.csv"
        atomic_write_bytes(manifest, item.manifest)
        atomic_write_text(manifest.with_suffix(".json"), summaries[item.key])
        paths.append(manifest)
    return paths


def prepare(
    datasets: Sequence[str],
    data_root: str | os.PathLike | None = None,
    raw_root: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    test_size: float | None = None,
    folds: int | None = None,
    seed: int | None = None,
    official_folds: bool = False,
    adapter_options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
    *,
    derived_root: str | os.PathLike | None = None,
    workers: int | None = None,
    splits: str | None = None,
    allow_partial: bool = False,
) -> list[Path]:
    """Prepare each dataset key; returns the manifest paths (``<out>/<key>.csv``), in the order given.

    Roots default to ``<data_root>/raw``, ``<data_root>/derived`` and ``<data_root>/manifests``, with
    ``data_root`` from the argument, else ``$BUSBENCH_DATA``, else ``data``. ``adapter_options`` maps a dataset
    key to keyword options of its adapter (e.g. ``{"bus_uclm": {...}}``). ``progress`` shows progress bars (on a
    terminal) and prints a summary table. Raises DataError, and writes nothing, if any dataset fails.

    Splits: with ``splits=None`` a dataset whose full public release busbench ships a reference split for
    (:func:`busbench.data.splits.reference_keys`) gets that split (v1) when its files are the release, checked
    image by image (missing images refused unless ``allow_partial``; images the release lacks refused; other bytes
    listed and warned about); any other dataset gets a split drawn with ``test_size`` (0.2), ``folds`` (5) and
    ``seed`` (42), and prepare says why. ``splits="v1"`` insists on the reference split, ``splits="new"`` always
    draws.
    """
    if splits is not None and splits not in SPLIT_CHOICES:
        raise DataError(f"--splits must be one of {', '.join(SPLIT_CHOICES)}, got {splits!r}")
    given = {"test_size": test_size, "folds": folds, "seed": seed}
    request = SplitRequest(
        splits=splits,
        explicit=tuple(name for name, value in given.items() if value is not None),
        allow_partial=allow_partial,
        **{name: DRAW_DEFAULTS[name] if value is None else value for name, value in given.items()},
    )
    test_size, folds, seed = request.test_size, request.folds, request.seed
    if not datasets:
        raise DataError("no datasets given; pass --datasets with one or more keys (e.g. busi busbra)")
    repeated = sorted(k for k, c in Counter(datasets).items() if c > 1)
    if repeated:
        raise DataError(f"dataset {repeated[0]!r} is listed more than once in --datasets")
    if not isinstance(test_size, (int, float)) or not 0.0 < float(test_size) < 1.0:
        raise DataError(f"--test-size must be between 0 and 1 (exclusive), got {test_size}")
    if int(folds) != folds or folds < 2:
        raise DataError(f"--folds must be an integer of at least 2, got {folds}")
    options = dict(adapter_options or {})
    unknown = sorted(set(options) - set(datasets))
    if unknown:
        raise DataError(
            f"adapter options given for {unknown[0]!r}, which is not among --datasets {list(datasets)}"
        )
    roots = DataRoots.resolve(data_root, raw_root, derived_root, out)
    for root in (roots.raw_root, roots.derived_root, roots.manifest_dir):
        check_utf8_path(root, "folder")  # manifests and summaries record these paths as UTF-8 text
    _check_roots(roots)
    if not roots.raw_root.is_dir():
        raise DataError(
            f"raw root {roots.raw_root} does not exist; unpack the datasets there (e.g. {roots.raw_root}/BUSI) "
            "or pass --raw-root / --data-root"
        )
    # Every key and option is checked before the first image is read.
    adapters = [get_adapter(key, **dict(options.get(key, {}))) for key in datasets]
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    prepared = [
        _prepare_one(
            adapter,
            roots,
            request=SplitRequest(
                splits=request.splits,
                test_size=float(test_size),
                folds=int(folds),
                seed=int(seed),
                explicit=request.explicit,
                allow_partial=request.allow_partial,
            ),
            official_folds=official_folds,
            workers=n_workers,
            progress=progress,
        )
        for adapter in adapters
    ]
    with _phase(",".join(datasets), "write"):
        paths = _write(prepared, roots)
    for item in prepared:
        for line in item.warnings:
            log.warning("%s", line)
    if progress:
        print(summary_table([p.summary for p in prepared]))
        for item in prepared:
            print(f"{item.key} split: {item.statement}")
        for path in paths:
            print(f"wrote {path} and {path.with_suffix('.json').name}")
    return paths


def summary_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table: images by label, patients, groups, duplicates, label conflicts, test and fold sizes."""
    header = [
        "dataset",
        "images",
        "normal",
        "benign",
        "malignant",
        "patients",
        "groups",
        "dup pairs",
        "conflicts",
        "test",
        "folds",
    ]
    lines = []
    for s in summaries:
        counts = s["counts"]
        lines.append(
            [
                s["dataset"],
                str(counts["images"]),
                *(str(counts["label"].get(lab, 0)) for lab in LABELS),
                str(s["patients"]),
                str(s["groups"]),
                str(len(s["duplicates"]["pairs"])),
                str(len(s["duplicates"]["label_conflicts"])),
                str(counts["split"].get("test", 0)),
                "/".join(str(v) for v in counts["fold"].values()),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [header, *lines])


# -------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        metavar="KEY",
        help="dataset keys: busi, curated_busi, busbra, bus_uc, bus_uclm, yap2018, or a plugin's key",
    )
    parser.add_argument(
        "--layout",
        default=None,
        metavar="LAYOUT",
        help="prepare a dataset of your own in a generic layout instead of --datasets: folder = images/ + masks/ "
        "(same stems) + optional meta.csv",
    )
    parser.add_argument("--key", default=None, metavar="NAME", help="with --layout: the new dataset's key")
    parser.add_argument(
        "--dataset-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="with --layout: the folder holding images/ and masks/ (default: <raw-root>/<key>)",
    )
    add_root_arguments(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for <key>.csv and <key>.json (default: <data-root>/manifests)",
    )
    parser.add_argument(
        "--splits",
        choices=SPLIT_CHOICES,
        default=None,
        help="v1: the reference split busbench ships for the full public releases of busi, curated_busi, "
        "busbra and bus_uclm, with the files checked against it; new: draw a split. Default: v1 for those "
        "datasets when the files are the public release, else a drawn split (prepare says which)",
    )
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="v1: accept a copy with images missing; present images keep their v1 split, and the summary "
        "JSON and the audit say 'partial'",
    )
    parser.add_argument(
        "--test-size", type=float, default=None, help="drawn splits: held-out test fraction (default 0.2)"
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=None,
        help="drawn splits: cross-validation folds over dev rows (default 5)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="drawn splits: seed for the test split and folds (default 42)"
    )
    parser.add_argument(
        "--official-folds",
        action="store_true",
        help="BUSBRA: dev rows keep the official 5-fold-cv.csv folds (test split still grouped here)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY.NAME=VALUE",
        help="adapter option for one dataset, e.g. bus_uclm.hesn_rule=exclude (repeatable)",
    )
    parser.add_argument(
        "--exclude-doppler",
        action="store_true",
        help="BUS-UCLM: leave out images with a colour-Doppler overlay (same as "
        "--option bus_uclm.exclude_doppler=true)",
    )
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: up to 4)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary table")


def parse_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``KEY.NAME=VALUE`` strings -> {key: {name: value}}; true/false/yes/no and integers are converted."""
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        match = re.match(r"^([a-z0-9_]+)\.([A-Za-z_][A-Za-z0-9_]*)=(.*)$", item)
        if not match:
            raise DataError(f"--option {item!r} is not KEY.NAME=VALUE (e.g. bus_uclm.hesn_rule=exclude)")
        key, name, raw = match.groups()
        value: Any = raw
        if raw.lower() in ("true", "yes"):
            value = True
        elif raw.lower() in ("false", "no"):
            value = False
        elif re.fullmatch(r"-?\d+", raw):
            value = int(raw)
        options.setdefault(key, {})[name] = value
    return options


def _cli_options(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    options = parse_options(args.option)
    if args.exclude_doppler:
        options.setdefault("bus_uclm", {})["exclude_doppler"] = True
    return options


def _requested(args: argparse.Namespace) -> tuple[list[str], Path | None, dict[str, dict[str, Any]]]:
    """Dataset keys, raw root and adapter options from ``--datasets`` or ``--layout/--key/--dataset-dir``."""
    options = _cli_options(args)
    if args.layout is None:
        if args.key is not None or args.dataset_dir is not None:
            raise DataError("--key and --dataset-dir go with --layout (e.g. --layout folder --key hospital_a)")
        if not args.datasets:
            raise DataError(
                "no datasets given; pass --datasets with one or more keys (e.g. busi busbra), or prepare your own "
                "data with --layout folder --key NAME --dataset-dir DIR"
            )
        return list(args.datasets), args.raw_root, options
    if args.datasets:
        raise DataError(f"--layout {args.layout} prepares one dataset under --key; leave out --datasets")
    if not args.key:
        raise DataError(f"--layout {args.layout} needs --key NAME, the key configs will use (e.g. hospital_a)")
    options.setdefault(args.key, {})["layout"] = args.layout
    raw_root = args.raw_root
    if args.dataset_dir is not None:
        if raw_root is not None:
            raise DataError("--dataset-dir and --raw-root both say where the data is; pass only one of them")
        raw_root = args.dataset_dir
        options[args.key]["folder"] = "."
    return [args.key], raw_root, options


def run(args: argparse.Namespace) -> int:
    datasets, raw_root, options = _requested(args)
    prepare(
        datasets,
        data_root=args.data_root,
        raw_root=raw_root,
        out=args.out,
        test_size=args.test_size,
        folds=args.folds,
        seed=args.seed,
        official_folds=args.official_folds,
        adapter_options=options,
        progress=not args.quiet and sys.stdout is not None,
        derived_root=args.derived_root,
        workers=args.workers,
        splits=args.splits,
        allow_partial=args.allow_partial,
    )
    return 0
