"""The local sweep (scripts/run_cnn.sh) run for real on synthetic data: 2 datasets x 2 models x 2 folds.

Checked: the leaderboard and per-run summaries it writes; a second run retrains nothing (fold done markers); a sweep
killed with SIGKILL mid-training finishes when started again and ends with the same scores as an uninterrupted one;
the first failing step stops the sweep with a message naming it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from busbench.data.prepare import prepare
from busbench.data.synth import synthesize
from busbench.engine.evaluate import SUMMARY_COLUMNS
from busbench.report.aggregate import SCORE_COLUMNS

REPO = Path(__file__).resolve().parents[2]
DATASETS = ("busi", "busbra")
MODELS = ("unet", "unext")
# per-model widths through the sweep's MODEL_SET_<model> hook (model.params differ between the two models)
MODEL_SETS = {
    "MODEL_SET_unet": "model.params.base_width=4",
    "MODEL_SET_unext": "model.params.widths=[4,8,8,16,16]",
}
TINY_EXPERIMENT = """\
experiment:
  name: e2e
data:
  image_size: 32
  num_workers: 0
train:
  epochs: 2
  batch_size: 4
  lr: 3.0e-3
  early_stopping: null
eval:
  batch_size: 8
output:
  tensorboard: false
  overlays: 0
"""
LEADERBOARD_COLUMNS = [
    "experiment",
    "train_data",
    "dataset",
    "model",
    "tag",
    "n_folds",
    "n_test",
    *[f"{c}_{s}" for c in SCORE_COLUMNS for s in ("mean", "std")],
    *[f"ensemble_{c}" for c in SCORE_COLUMNS],
    "params_m",
    "gmacs",
    "train_seconds",
    "image_size",
    "resolution",
    "hd95_mode",
    "tta",
    "threshold",
    "selection_threshold",
    "manifest_sha256",
    "run",
]
# what must not depend on how often the sweep was started (timings and folders may)
SCORES = [
    "dataset",
    "model",
    "n_folds",
    "n_test",
    *[f"{c}_{s}" for c in SCORE_COLUMNS for s in ("mean", "std")],
    *[f"ensemble_{c}" for c in SCORE_COLUMNS],
    "params_m",
    "gmacs",
]


@pytest.fixture(scope="module")
def sweep_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Prepared synthetic BUSI and BUSBRA layouts (2 folds) and the tiny experiment file."""
    root = tmp_path_factory.mktemp("sweep")
    data = root / "data"
    synthesize("busi", data / "raw" / "BUSI", n=16, seed=0)
    synthesize("busbra", data / "raw" / "BUSBRA", n=20, seed=1)
    prepare(list(DATASETS), data_root=data, folds=2, test_size=0.25, seed=42, progress=False)
    config = root / "tiny.yaml"
    config.write_text(TINY_EXPERIMENT)
    return data, config


def sweep_env(
    config: Path, results: Path, datasets: tuple[str, ...], models: tuple[str, ...]
) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        **MODEL_SETS,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "DATASETS": " ".join(datasets),
        "MODELS": " ".join(models),
        "FOLDS": "2",
        "CONFIG": str(config),
        "EXPERIMENT": "e2e",
        "RESULTS": str(results),
    }
    assert shutil.which("busbench", path=env["PATH"]), "the busbench console script is not installed"
    return env


def start_sweep(
    inputs: tuple[Path, Path],
    results: Path,
    log: Path,
    datasets: tuple[str, ...] = DATASETS,
    models: tuple[str, ...] = MODELS,
) -> subprocess.Popen:
    data, config = inputs
    with log.open("w") as out:
        return subprocess.Popen(
            ["bash", "scripts/run_cnn.sh", "--set", f"data.data_root={data}"],
            cwd=REPO,
            env=sweep_env(config, results, datasets, models),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so the test can kill the whole sweep
        )


def run_sweep(inputs: tuple[Path, Path], results: Path, log: Path, **lists: tuple[str, ...]) -> str:
    proc = start_sweep(inputs, results, log, **lists)
    rc = proc.wait(timeout=1800)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    return text


def fold_files(results: Path) -> dict[Path, int]:
    """Modification times of every fold output (lock files aside)."""
    return {
        p: p.stat().st_mtime_ns
        for p in sorted((results / "e2e").glob("*/*/fold*/*"))
        if p.is_file() and p.name != ".lock"
    }


def scores(board: pd.DataFrame) -> pd.DataFrame:
    return board[SCORES].sort_values(["dataset", "model"]).reset_index(drop=True)


@pytest.mark.slow
def test_sweep_end_to_end_rerun_and_kill(sweep_inputs: tuple[Path, Path], tmp_path: Path):
    data, _ = sweep_inputs
    results = tmp_path / "results"
    out = run_sweep(sweep_inputs, results, tmp_path / "first.log")
    board_path = results / "e2e" / "leaderboard.csv"
    assert f"leaderboard: {results}/e2e/leaderboard.csv" in out
    board = pd.read_csv(board_path)
    assert list(board.columns) == LEADERBOARD_COLUMNS
    assert sorted(zip(board["dataset"], board["model"], strict=True)) == sorted(
        (d, m) for d in DATASETS for m in MODELS
    )
    assert (board["n_folds"] == 2).all() and (board["experiment"] == "e2e").all()
    for d in DATASETS:
        manifest = pd.read_csv(data / "manifests" / f"{d}.csv")
        assert (board.loc[board["dataset"] == d, "n_test"] == (manifest["split"] == "test").sum()).all()
        for m in MODELS:
            run = results / "e2e" / d / m
            summary = pd.read_csv(run / "summary.csv", dtype={"fold": str})
            assert list(summary.columns) == list(SUMMARY_COLUMNS)
            assert summary["fold"].tolist() == ["0", "1", "mean", "std", "ensemble"]
            row = board[(board["dataset"] == d) & (board["model"] == m)].iloc[0]
            ensemble = summary.set_index("fold").loc["ensemble"]
            assert row["ensemble_dice"] == pytest.approx(ensemble["dice"])
            assert row["dice_mean"] == pytest.approx(summary["dice"][:2].mean())
            for k in (0, 1):
                assert (run / f"fold{k}" / "done.json").is_file()
    # each model got its own tiny widths (base_width 4 for U-Net, not 64 with 34.5 M; UNeXt not the paper's 1.47 M)
    params = board.groupby("model")["params_m"].agg(["min", "max"])
    assert (params["min"] == params["max"]).all() and (params["max"] < 0.5).all()
    assert params.loc["unet", "max"] != params.loc["unext", "max"]

    # a second run retrains nothing; the test step recomputes the same summaries
    before = fold_files(results)
    summaries = {p: p.read_bytes() for p in sorted((results / "e2e").glob("*/*/summary.csv"))}
    again = run_sweep(sweep_inputs, results, tmp_path / "second.log")
    assert again.count("skipping it") == len(DATASETS) * len(MODELS) * 2
    assert "epoch 1/2" not in again
    assert fold_files(results) == before
    assert {p: p.read_bytes() for p in summaries} == summaries
    pd.testing.assert_frame_equal(scores(pd.read_csv(board_path)), scores(board))

    # killed mid-training (SIGKILL: no chance to clean up), then started again: same scores as uninterrupted
    killed = tmp_path / "killed"
    first_fold = killed / "e2e" / "busi" / "unet" / "fold0"
    one = {"datasets": ("busi",), "models": ("unet",)}
    proc = start_sweep(sweep_inputs, killed, tmp_path / "killed.log", **one)
    deadline = time.monotonic() + 900
    while not (first_fold / "checkpoint_last.pt").is_file() and proc.poll() is None:
        assert time.monotonic() < deadline, "the sweep never finished an epoch"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not (killed / "e2e" / "leaderboard.csv").exists()
    mid_fold = not (first_fold / "done.json").exists()
    log = run_sweep(sweep_inputs, killed, tmp_path / "resumed.log", **one)
    if mid_fold:  # almost always: the kill came during fold 0's second epoch
        assert "fold 0: resuming after epoch 1" in log
    resumed = pd.read_csv(killed / "e2e" / "leaderboard.csv")
    pd.testing.assert_frame_equal(
        scores(resumed),
        scores(board[(board["dataset"] == "busi") & (board["model"] == "unet")]),
        check_exact=True,
    )
    # scores of barely trained models can tie by chance; the weights cannot
    for k in (0, 1):
        for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
            a = torch.load(results / "e2e" / "busi" / "unet" / f"fold{k}" / name, weights_only=True)
            b = torch.load(killed / "e2e" / "busi" / "unet" / f"fold{k}" / name, weights_only=True)
            assert a["epoch"] == b["epoch"]
            assert a["model"].keys() == b["model"].keys()
            for key, tensor in a["model"].items():
                assert torch.equal(tensor, b["model"][key]), f"fold{k} {name}: {key} differs"


def test_first_failure_stops_the_sweep(sweep_inputs: tuple[Path, Path], tmp_path: Path):
    results = tmp_path / "results"
    proc = start_sweep(
        sweep_inputs, results, tmp_path / "bad.log", datasets=("busi",), models=("unetx", "unet")
    )
    rc = proc.wait(timeout=600)
    text = (tmp_path / "bad.log").read_text()
    assert rc == 1, text
    assert "unknown model 'unetx'" in text
    assert "stopped: busbench train (busi, unetx) failed (exit status 1)" in text
    lines = text.splitlines()
    assert "stopped:" in lines[-1]  # nothing ran after the failing step
    assert "training unet" not in text and "testing" not in text and "leaderboard:" not in text
    assert not (results / "e2e" / "busi").exists()
