"""Which test images a trained model has already seen, through any dataset it learned from.

BUSI and Curated BUSI hold the same images under the same sample ids (Curated BUSI is BUSI minus its
near-duplicates and inconsistent images), and their splits are drawn independently. So a model trained on one of
them and scored on the other's test split could be scored on

* an image it trained or validated on (the same sample id), or
* a near-copy of such an image: BUSI keeps both copies of a duplicated scan in one near-duplicate group, while
  Curated BUSI keeps only one of them, under its own id.

The rule: the sample ids of every dataset a run learned from (its own data, and the data of every run in its
``train.init_from`` chain) are nodes of one graph, linked when they share a ``group_id`` or a ``patient_id`` in any
manifest involved, and linked across datasets of one image family when they carry the same sample id. A target
test image is left out when its connected component holds any development image (training or validation fold) of
a dataset the run learned from. Datasets of different families share no images, and nothing is left out.

Every manifest the run learned from must be the one it was trained on: its SHA-256 is checked against what the run
recorded (``fold<k>/run.json``), so a re-prepared split cannot hide a leak.

Unions of datasets that share images (``data.dataset: [busi, curated_busi]``) are refused when the config is
validated (:func:`busbench.config.dataset_conflicts`): each dataset's own test split would hold the other's
development images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from busbench.config import IMAGE_FAMILIES, Config, config_from_file
from busbench.errors import DataError

RUN_CONFIG = "config.yaml"
EXCLUDED_COLUMNS = ("sample_id", "reason")


def family(key: str) -> str:
    """The image family of a dataset key (datasets of one family hold the same images under the same ids)."""
    return IMAGE_FAMILIES.get(key, key)


@dataclass(frozen=True)
class Source:
    """A dataset a run learned from: the config that read it, and the manifest hash that run recorded."""

    dataset: str
    cfg: Config
    manifest_sha256: str | None
    run: Path


def recorded_manifests(run_dir: Path) -> dict[str, str]:
    """Manifest hashes a run's folds were trained on (``fold<k>/run.json``); all folds must agree."""
    seen: dict[str, str] = {}
    for path in sorted(Path(run_dir).glob("fold*/run.json")):
        hashes = json.loads(path.read_text(encoding="utf-8")).get("manifest_sha256", {}) or {}
        for key, value in hashes.items():
            if seen.setdefault(key, value) != value:
                raise DataError(
                    f"{run_dir}: folds were trained on different versions of the {key} manifest; retrain the run "
                    "on one manifest (busbench train --no-resume)"
                )
    return seen


def source_run(init_from: str | Path) -> Path:
    """The run folder behind ``train.init_from`` (a run folder, one of its fold folders or a fold's checkpoint)."""
    path = Path(init_from)
    for folder in (path, path.parent, path.parent.parent):
        if (folder / RUN_CONFIG).is_file():
            return folder
    raise DataError(
        f"config key 'train.init_from' is {str(init_from)!r}, and no {RUN_CONFIG} was found there or in the two "
        "folders above it, so the data those weights learned from cannot be told; point train.init_from at a run "
        "folder of busbench train (or a fold folder / checkpoint inside one)"
    )


def learned_from(cfg: Config, run_dir: Path, recorded: dict[str, str] | None = None) -> list[Source]:
    """Every dataset the run at ``run_dir`` learned from: its own, then those of its ``train.init_from`` chain."""
    sources: list[Source] = []
    visited: set[Path] = set()
    current_cfg, current_dir = cfg, Path(run_dir)
    hashes = recorded_manifests(current_dir) if recorded is None else recorded
    while True:
        resolved = current_dir.resolve()
        if resolved in visited:
            raise DataError(f"train.init_from of {current_dir} leads back to itself; fix the chain of runs")
        visited.add(resolved)
        sources += [Source(k, current_cfg, hashes.get(k), current_dir) for k in current_cfg.data.datasets]
        if not current_cfg.train.init_from:
            return sources
        current_dir = source_run(current_cfg.train.init_from)
        current_cfg = config_from_file(current_dir / RUN_CONFIG)
        hashes = recorded_manifests(current_dir)


def _checked_rows(source: Source) -> pd.DataFrame:
    from busbench.data.loader import load_dataset_rows

    rows, info = load_dataset_rows(source.cfg, source.dataset)
    now = str(info["manifest_sha256"])
    if source.manifest_sha256 is not None and source.manifest_sha256 != now:
        raise DataError(
            f"the {source.dataset} manifest {info['manifest']} changed since the run was trained ({source.run}: "
            f"sha256 {source.manifest_sha256[:12]} at training, {now[:12]} now), so the images it learned from "
            "cannot be told; restore the manifest it was trained on, or retrain it"
        )
    return rows


def _components(frames: list[pd.DataFrame]) -> pd.Series:
    """Component label of every (dataset, sample_id) node, linked by group, patient and shared image ids."""
    nodes = pd.concat(frames, ignore_index=True)
    node_ids = nodes["dataset"].astype(str) + "\x1f" + nodes["sample_id"].astype(str)
    codes, uniques = pd.factorize(node_ids)
    n = len(uniques)
    edges: list[np.ndarray] = []
    keys = [
        nodes["dataset"].astype(str) + "\x1fg\x1f" + nodes["group_id"].astype(str),
        nodes["family"] + "\x1fi\x1f" + nodes["sample_id"].astype(str),
    ]
    patient = nodes["patient_id"].astype(str)
    has_patient = patient.str.len() > 0
    keys.append((nodes["dataset"].astype(str) + "\x1fp\x1f" + patient).where(has_patient, None))
    for key in keys:
        valid = key.notna().to_numpy()
        link, _ = pd.factorize(key[valid])
        # every node of a key links to the key's first node: a star per key connects it
        first = pd.Series(codes[valid]).groupby(link).transform("first").to_numpy()
        edges.append(np.stack([codes[valid], first]))
    pairs = np.concatenate(edges, axis=1)
    graph = coo_matrix((np.ones(pairs.shape[1], dtype=np.int8), (pairs[0], pairs[1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return pd.Series(labels, index=pd.Index(uniques, name="node"))


def excluded_test_images(target: pd.DataFrame, target_key: str, sources: list[Source]) -> pd.DataFrame:
    """Test rows of ``target`` (all manifest rows of ``target_key``) linked to an image the run learned from.

    Returns ``sample_id, reason`` (sorted by sample id); empty when no source shares the target's image family.
    """
    related = [s for s in sources if family(s.dataset) == family(target_key)]
    if not related:
        return pd.DataFrame(columns=list(EXCLUDED_COLUMNS))
    frames = [target.assign(dataset=target_key, family=family(target_key))]
    seen_parts = []
    for s in related:
        rows = _checked_rows(s)
        frames.append(rows.assign(dataset=s.dataset, family=family(s.dataset)))
        dev = rows.loc[rows["split"] == "dev", "sample_id"].astype(str)
        seen_parts.append(pd.DataFrame({"dataset": s.dataset, "sample_id": dev.to_numpy()}))
    columns = ["dataset", "family", "sample_id", "group_id", "patient_id"]
    component = _components([f[columns] for f in frames])
    seen = pd.concat(seen_parts, ignore_index=True).drop_duplicates()
    seen_nodes = seen["dataset"] + "\x1f" + seen["sample_id"]
    seen_by_component: dict[int, str] = {}
    for node, (key, sid) in zip(seen_nodes, seen.itertuples(index=False, name=None), strict=True):
        seen_by_component.setdefault(int(component[node]), f"{key} {sid}")
    seen_ids = {(k, sid) for k, sid in seen.itertuples(index=False, name=None)}
    test = target[target["split"] == "test"]
    out = []
    for sid in sorted(test["sample_id"].astype(str)):
        label = int(component[f"{target_key}\x1f{sid}"])
        if label not in seen_by_component:
            continue
        same = sorted(k for k, s in seen_ids if s == sid and family(k) == family(target_key))
        if same:
            reason = f"a development image of {'+'.join(same)} (trained or validated on)"
        else:
            reason = (
                f"same near-duplicate group or patient as the development image {seen_by_component[label]}"
            )
        out.append({"sample_id": sid, "reason": reason})
    return pd.DataFrame(out, columns=list(EXCLUDED_COLUMNS))


def excluded_for_run(cfg: Config, run_dir: Path, target_key: str, recorded: dict[str, str]) -> pd.DataFrame:
    """:func:`excluded_test_images` of ``target_key``'s test split for the run at ``run_dir``."""
    from busbench.data.loader import load_dataset_rows

    sources = learned_from(cfg, run_dir, recorded)
    if not any(family(s.dataset) == family(target_key) for s in sources):
        return pd.DataFrame(columns=list(EXCLUDED_COLUMNS))
    target, _ = load_dataset_rows(cfg, target_key)
    return excluded_test_images(target, target_key, sources)
