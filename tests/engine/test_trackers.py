"""``output.tracker``: a tiny run trained and tested with MLflow (local file store) and with wandb (offline), and what
each tracker recorded read back from its own files; a missing extra is one clear error before anything is written."""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from engine_testdata import tiny_config

from busbench.config import config_from_file
from busbench.engine import trackers
from busbench.engine.evaluate import evaluate_run
from busbench.engine.train import train
from busbench.errors import ConfigError

SCALARS = {"train/loss": "train_loss", "train/lr": "lr", "val/dice": "val_dice", "val/iou": "val_iou"}


def _train_and_test(synthetic_root: Path, out: Path, tracker: str) -> Path:
    cfg = tiny_config(synthetic_root, out, f"output.tracker={tracker}", "output.overlays=2", "train.epochs=2")
    train(cfg)
    run_dir = out / "demo" / "busi" / "unet"
    evaluate_run(run_dir)
    return run_dir


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pytest.importorskip("mlflow")
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks file stores to opt in
    return uri


def test_mlflow_mirrors_scalars_config_overlays_and_summary(synthetic_root, tmp_path, mlflow_store):
    from mlflow import MlflowClient

    run_dir = _train_and_test(synthetic_root, tmp_path / "results", "mlflow")
    client = MlflowClient(tracking_uri=mlflow_store)
    experiment = client.get_experiment_by_name("demo")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["busi/unet/fold0", "busi/unet/fold1", "busi/unet/test"]
    saved = config_from_file(run_dir / "config.yaml")
    for fold in (0, 1):
        run = runs[f"busi/unet/fold{fold}"]
        run_id = run.info.run_id
        assert run.info.status == "FINISHED"
        log = pd.read_csv(run_dir / f"fold{fold}" / "train_log.csv")
        for key, column in SCALARS.items():
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            assert [step for step, _ in history] == log["epoch"].tolist()
            assert [value for _, value in history] == pytest.approx(log[column].tolist())
        assert run.data.params["train.epochs"] == "2" and run.data.params["data.image_size"] == "32"
        assert run.data.params["output.tracker"] == "mlflow"
        config = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text())
        assert config == saved.to_dict()
        overlays = sorted(a.path for a in client.list_artifacts(run_id, "overlays"))
        assert overlays == [f"overlays/epoch{e:04d}_{i}.png" for e in (1, 2) for i in (0, 1)]
        state = json.loads((run_dir / f"fold{fold}" / trackers.STATE_FILE).read_text())
        assert state == {"tracker": "mlflow", "run_id": run_id}
    test_run = runs["busi/unet/test"]
    copy = client.download_artifacts(test_run.info.run_id, "summary.csv", str(tmp_path / "dl"))
    assert Path(copy).read_bytes() == (run_dir / "summary.csv").read_bytes()
    assert test_run.info.status == "FINISHED"


def test_mlflow_run_is_resumed_from_the_fold_folder(tmp_path, mlflow_store):
    from mlflow import MlflowClient

    cfg = tiny_config(tmp_path, tmp_path, "output.tracker=mlflow")
    first = trackers.start(cfg, tmp_path, "busi/unet/fold0")
    first.scalars({"train/loss": 1.0, "val/dice": float("nan")}, 1)
    first.close()
    second = trackers.start(cfg, tmp_path, "busi/unet/fold0")
    second.scalars({"train/loss": 0.5}, 2)
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        second.close()
    client = MlflowClient(tracking_uri=mlflow_store)
    assert second.run_id == first.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "train/loss")] == [(1, 1.0), (2, 0.5)]
    assert client.get_metric_history(first.run_id, "val/dice") == []  # non-finite values are not sent
    assert client.get_run(first.run_id).info.status == "KILLED"


def _wandb_records(path: Path) -> list:
    """The records of a wandb ``.wandb`` file (a LevelDB-style log of protobuf records in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunks, pending = path.read_bytes(), 7, [], b""  # 7-byte file header ":W&B" + magic + version
    while pos + 7 <= len(data):
        space = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if space >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += space
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        else:
            chunks.append(pending + chunk)
    return [pb.Record.FromString(c) for c in chunks]


def _offline_run(folder: Path) -> list:
    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    return _wandb_records(path)


def test_wandb_offline_mirrors_scalars_config_overlays_and_summary(synthetic_root, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    run_dir = _train_and_test(synthetic_root, tmp_path / "results", "wandb")
    saved = config_from_file(run_dir / "config.yaml").to_dict()
    for fold in (0, 1):
        records = _offline_run(run_dir / f"fold{fold}")
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert run.display_name == f"busi/unet/fold{fold}" and run.run_group == "demo/busi/unet"
        config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
        assert config == saved
        state = json.loads((run_dir / f"fold{fold}" / trackers.STATE_FILE).read_text())
        assert state == {"tracker": "wandb", "run_id": run.run_id}
        logged: dict[int, dict] = {}
        for r in records:
            if r.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                logged.setdefault(items["_step"], {}).update(items)
        log = pd.read_csv(run_dir / f"fold{fold}" / "train_log.csv")
        assert sorted(logged) == log["epoch"].tolist()
        for _, row in log.iterrows():
            step = logged[int(row["epoch"])]
            for key, column in SCALARS.items():
                assert step[key] == pytest.approx(row[column])
            assert step["val/overlay/count"] == 2
            for name in step["val/overlay/filenames"]:
                assert (next((run_dir / f"fold{fold}").glob("wandb/offline-run-*/files")) / name).is_file()
        assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)
    records = _offline_run(run_dir)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "busi/unet/test"
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    (artifact,) = [a for a in artifacts if a.type == "results"]  # the table is logged as an artifact too
    (entry,) = artifact.manifest.contents
    digest = hashlib.md5((run_dir / "summary.csv").read_bytes()).digest()
    assert entry.path == "summary.csv" and entry.digest == __import__("base64").b64encode(digest).decode()
    tables = [
        i for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item
        if (i.key or "/".join(i.nested_key)) == "summary/_type"
    ]
    assert tables and json.loads(tables[0].value_json) == "table-file"


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_missing_extra_is_one_clear_error_before_anything_is_written(
    synthetic_root, tmp_path, monkeypatch, tracker
):
    monkeypatch.setitem(sys.modules, tracker, None)  # import fails as when the package is not installed
    out = tmp_path / "results"
    cfg = tiny_config(synthetic_root, out, f"output.tracker={tracker}")
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value) == (
        f'output.tracker={tracker} needs the {tracker} package: pip install "busbench[{tracker}]" '
        "(or set output.tracker=tensorboard)"
    )
    assert not out.exists()


def test_tensorboard_is_the_default_and_starts_no_tracker(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    assert cfg.output.tracker == "tensorboard"
    tracker = trackers.start(cfg, tmp_path, "busi/unet/fold0")
    assert type(tracker) is trackers.Tracker
    assert not (tmp_path / trackers.STATE_FILE).exists()
