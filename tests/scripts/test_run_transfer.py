"""scripts/run_transfer.sh: the plan it prints, and (slow) one real run on tiny synthetic data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]


def run(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    full = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **env,
    }
    return subprocess.run(
        ["bash", "scripts/run_transfer.sh", *args],
        cwd=REPO,
        env=full,
        capture_output=True,
        text=True,
        check=check,
    )


def test_dry_run_plan():
    env = {"DATASETS": "busi busbra", "MODELS": "unet", "FOLDS": "2"}
    lines = run(["--dry-run", "--set", "train.epochs=1"], env).stdout.splitlines()
    train = [line for line in lines if line.startswith("busbench train")]
    assert len(train) == 2 and all("experiment.name=transfer " in line for line in train)
    assert [line.strip() for line in lines if "--dataset" in line] == [
        "busbench test --run results/transfer/busi/unet --dataset busbra",
        "busbench test --run results/transfer/busbra/unet --dataset busi",
    ]
    assert lines[-2].strip() == "busbench transfer results/transfer --out results/transfer"
    assert lines[-1].strip() == "busbench plot transfer results/transfer/transfer.csv --out results/transfer"


def test_dry_run_with_fine_tuning():
    env = {"DATASETS": "busi busbra", "MODELS": "unet", "FOLDS": "2"}
    lines = run(["--dry-run", "--freeze-encoder", "--ft-set", "train.lr=1e-5"], env).stdout.splitlines()
    tuned = [line for line in lines if "train.init_from" in line]
    assert len(tuned) == 2  # busi -> busbra and busbra -> busi, each training its 2 folds in one call
    assert all("--fold" not in line for line in tuned)
    first = tuned[0]
    assert "data.dataset=busbra" in first and "experiment.name=transfer-from-busi" in first
    assert "train.init_from=results/transfer/busi/unet train.freeze_encoder=true train.lr=1e-5" in first
    assert all(
        "train.lr=1e-5" not in line
        for line in lines
        if line.startswith("busbench train") and line not in tuned
    )
    assert "busbench test --run results/transfer-from-busi/busbra/unet --dataset busi" in [
        s.strip() for s in lines
    ]
    assert lines[-2].strip() == (
        "busbench transfer results/transfer results/transfer-from-busi results/transfer-from-busbra "
        "--out results/transfer"
    )


def test_unknown_argument_is_refused():
    res = run(["--dry-run", "--bogus"], {"DATASETS": "busi", "MODELS": "unet"}, check=False)
    assert res.returncode == 2 and "unknown argument '--bogus'" in res.stderr


@pytest.mark.slow
def test_real_run_writes_the_matrix(tmp_path):
    from busbench.data.prepare import prepare
    from busbench.data.synth import synthesize

    root = tmp_path / "data"
    synthesize("busi", root / "raw" / "BUSI", n=20, seed=1)
    synthesize("busbra", root / "raw" / "BUSBRA", n=20, seed=2)
    prepare(["busi", "busbra"], data_root=root, folds=2, test_size=0.25, progress=False)
    results = tmp_path / "results"
    sets = [
        f"data.data_root={root}",
        "data.image_size=32",
        "model.params.base_width=4",
        "train.epochs=1",
        "train.batch_size=4",
        "output.tensorboard=false",
        "data.num_workers=0",
    ]
    args = ["--config", "configs/experiments/demo.yaml", "--results", str(results), "--finetune"]
    for s in sets:
        args += ["--set", s]
    res = run(
        args, {"DATASETS": "busi busbra", "MODELS": "unet", "FOLDS": "2", "OMP_NUM_THREADS": "1"}, check=False
    )
    assert res.returncode == 0, res.stderr[-3000:]
    table = pd.read_csv(results / "transfer" / "transfer.csv")
    ensemble = table[table["source"] == "ensemble"]
    assert sorted(zip(ensemble["train_dataset"], ensemble["test_dataset"], strict=True)) == [
        ("busbra", "busbra"),
        ("busbra", "busi"),
        ("busbra->busi", "busbra"),
        ("busbra->busi", "busi"),
        ("busi", "busbra"),
        ("busi", "busi"),
        ("busi->busbra", "busbra"),
        ("busi->busbra", "busi"),
    ]
    assert (results / "transfer" / "transfer_heatmap.png").is_file()
    assert (results / "transfer" / "leaderboard.csv").is_file()
