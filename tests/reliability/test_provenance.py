"""Provenance and safe loading: a manifest cannot point training outside its data root, checkpoints say which code
and setup wrote them and refuse the wrong model, a checkpoint never runs code when loaded, and every fold's run.json
records what is needed to trace a number back to code, environment and data.

Unit-level checks live elsewhere: path containment in ``tests/data/test_prepare.py`` and ``test_audit.py``, the
weights_only / safe_load source rules in ``test_security.py``, a wider U-Net's weights in
``tests/engine/test_train.py``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import busbench
from busbench import cli
from busbench.config import config_from_file
from busbench.data.manifest import manifest_sha256
from busbench.engine import checkpoint as ckpt
from busbench.engine.runlog import git_commit
from busbench.errors import ModelError
from busbench.models import create_model

REPO = Path(__file__).resolve().parents[2]


def experiment_file(folder: Path, data_root: Path, out: Path) -> Path:
    config = {
        "experiment": {"name": "prov"},
        "data": {
            "dataset": "busi",
            "data_root": str(data_root),
            "image_size": 32,
            "folds": 2,
            "num_workers": 0,
            "cache": False,
        },
        "model": {"name": "unet", "params": {"base_width": 4}},
        "train": {"epochs": 1, "batch_size": 4, "seed": 3},
        "output": {"root": str(out), "tensorboard": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def one_error_line(capsys: pytest.CaptureFixture[str], command: str, *args: object) -> str:
    capsys.readouterr()
    code = cli.main([command, *map(str, args)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith(f"busbench {command}: error: "), err
    return lines[0].removeprefix(f"busbench {command}: error: ")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUSBENCH_CONFIGS", os.fspath(REPO / "configs"))


@pytest.fixture(scope="module")
def trained(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Fold 0 trained for one epoch through the command line; returns (experiment file, fold folder)."""
    folder = tmp_path_factory.mktemp("prov")
    config = experiment_file(folder, prepared, folder / "out")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("BUSBENCH_CONFIGS", os.fspath(REPO / "configs"))
        assert cli.main(["train", "--config", str(config), "--fold", "0"]) == 0
    return config, folder / "out" / "prov" / "busi" / "unet" / "fold0"


# ------------------------------------------------------------------------------------------------ manifest paths


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("image_path", "../../../../etc/passwd", "contains '..' and would leave its root"),
        ("image_path", "/etc/passwd", "is absolute"),
        ("mask_path", "busi/../../../outside.png", "contains '..' and would leave its root"),
    ],
)
def test_manifest_path_leaving_the_data_root_is_refused_before_training(
    prepared, tmp_path, env, capsys, column, value, problem
):
    data = tmp_path / "data"
    shutil.copytree(prepared, data, ignore=shutil.ignore_patterns("cache"))
    manifest = data / "manifests" / "busi.csv"
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    row = df.index[df["split"] == "dev"][0]
    df.loc[row, column] = value
    df.to_csv(manifest, index=False, lineterminator="\n")
    out = tmp_path / "results"

    message = one_error_line(capsys, "train", "--config", experiment_file(tmp_path, data, out))
    assert message.startswith(f"manifest {manifest}: column '{column}' holds a path that {problem}")
    assert f"(row '{df.loc[row, 'sample_id']}')" in message and "re-run busbench prepare" in message
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_record_the_busbench_version_and_the_setup_hash(trained):
    _, fold = trained
    cfg = config_from_file(fold.parent / "config.yaml")
    run = json.loads((fold / "run.json").read_text())
    for name in (ckpt.LAST, ckpt.BEST):
        payload = torch.load(fold / name, map_location="cpu", weights_only=True)
        assert payload["busbench_version"] == busbench.__version__
        assert payload["config_hash"] == ckpt.training_hash(cfg) == run["training_hash"]
        assert payload["model_name"] == "unet" and payload["fold"] == 0


@pytest.mark.parametrize(
    ("name", "params", "problem"),
    [
        ("unet", {"base_width": 8}, r"tensor\(s\) with another shape"),
        ("attunet", {"base_width": 4}, r"tensor\(s\) missing"),
    ],
)
def test_checkpoint_into_another_model_is_a_model_error(trained, name, params, problem):
    _, fold = trained
    path = fold / ckpt.BEST
    model = create_model(name, in_channels=1, num_classes=1, image_size=32, **params)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ModelError, match=rf"checkpoint {re.escape(str(path))} \(model 'unet'\) does not fit"
    ) as err:
        ckpt.load_model_state(model, ckpt.load_checkpoint(path), path)
    assert re.search(problem, str(err.value)) and "model.name and model.params" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


class _Payload:
    """Unpickling this would create ``marker`` - what a booby-trapped checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_booby_trapped_checkpoint_is_refused_without_running_its_code(trained, tmp_path, env, capsys):
    config, fold = trained
    work = tmp_path / "out" / "prov" / "busi" / "unet"
    shutil.copytree(fold.parent, work, ignore=shutil.ignore_patterns(".lock"))
    cfg_file = tmp_path / "experiment.yaml"
    spec = yaml.safe_load(config.read_text())
    spec["output"]["root"] = str(tmp_path / "out")
    cfg_file.write_text(yaml.safe_dump(spec))
    (work / "fold0" / "done.json").unlink()  # so that training resumes from checkpoint_last.pt
    marker = tmp_path / "code_ran"
    malicious = {"format": 1, "model": _Payload(marker)}
    with open(work / "fold0" / ckpt.LAST, "wb") as fh:
        torch.save(malicious, fh, pickle_module=pickle)

    message = one_error_line(capsys, "train", "--config", cfg_file, "--fold", "0")
    assert message.startswith(f"checkpoint {work / 'fold0' / ckpt.LAST} cannot be read")
    assert "delete it and train the fold again" in message
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ run.json


def test_run_json_traces_code_environment_data_and_time(trained, prepared):
    _, fold = trained
    info = json.loads((fold / "run.json").read_text())
    cfg = config_from_file(fold.parent / "config.yaml")

    assert info["busbench_version"] == busbench.__version__
    assert info["git_commit"] == git_commit()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(busbench.__file__).parent, capture_output=True, text=True
    )
    if head.returncode == 0:  # running from a git checkout: the commit, marked when the tree has changes
        assert re.fullmatch(rf"{head.stdout.strip()}(\+dirty)?", info["git_commit"])
    else:
        assert info["git_commit"] is None
    assert info["torch"] == torch.__version__ and info["cuda"] == torch.version.cuda
    assert info["device"] == "cpu" and info["python"] and info["platform"]

    manifest = prepared / "manifests" / "busi.csv"
    recorded = json.loads((prepared / "manifests" / "busi.json").read_text())
    assert info["manifest_sha256"] == {"busi": manifest_sha256(manifest)}
    assert manifest_sha256(manifest) in json.dumps(recorded)  # the hash prepare recorded for the same file
    assert info["seeds"] == {"train": 3, "data_split": cfg.data.seed}
    assert info["config_hash"] == cfg.hash() and info["training_hash"] == ckpt.training_hash(cfg)

    assert info["status"] == "completed"
    (session,) = info["sessions"]
    start, end = dt.datetime.fromisoformat(session["start"]), dt.datetime.fromisoformat(session["end"])
    assert start.tzinfo is not None and start <= end <= dt.datetime.now().astimezone()
    assert session["status"] == "completed" and session["resumed_from_epoch"] == 0


def test_git_commit_is_null_outside_a_repository(tmp_path):
    assert git_commit(tmp_path) is None
