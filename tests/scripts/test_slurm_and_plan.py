"""Sweep plans and the Slurm array generator, checked without a cluster: syntax, index -> command mapping."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(cmd: list[str], env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, check=check)


def test_dry_run_prints_the_whole_plan():
    out = run(
        ["bash", "scripts/run_cnn.sh", "--dry-run", "--set", "train.epochs=1"],
        env={"DATASETS": "busi busbra", "MODELS": "unet unext", "FOLDS": "2", "EXPERIMENT": "plan"},
    ).stdout.splitlines()
    assert out[0] == "# plan: 8 folds (2 per run); experiment 'plan' under results/"
    # one training command per (dataset, model), training every fold, then the test of that run
    runs = [(d, m) for d in ("busi", "busbra") for m in ("unet", "unext")]
    train = [line for line in out if line.startswith("busbench train")]
    assert len(train) == len(runs)
    for line, (d, m) in zip(train, runs, strict=True):
        assert f"--config configs/experiments/benchmark.yaml --set data.dataset={d} model.name={m} data.folds=2" in line
        assert "--fold" not in line
    assert all("train.epochs=1" in line and "experiment.name=plan" in line for line in train)
    assert out[1:-1] == [
        line for t, (d, m) in zip(train, runs, strict=True) for line in (t, f"busbench test --run results/plan/{d}/{m}")
    ]
    assert out[-1] == "busbench aggregate results/plan --out results/plan"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--folds", "1"], "FOLDS must be an integer >= 2"),
        (["--config", "nope.yaml"], "config nope.yaml not found"),
        (["--bogus"], "unknown argument '--bogus'"),
    ],
)
def test_bad_arguments_fail_clearly(args, message):
    res = run(
        ["bash", "scripts/run_cnn.sh", "--dry-run", *args],
        env={"DATASETS": "busi", "MODELS": "unet"},
        check=False,
    )
    assert res.returncode == 2
    assert message in res.stderr


def test_slurm_array_maps_each_index_to_its_command(tmp_path: Path):
    env = {"DATASETS": "busi busbra", "MODELS": "unet unext", "FOLDS": "3", "EXPERIMENT": "cl"}
    run(
        [
            "bash",
            "scripts/slurm_sweep.sh",
            "--out",
            str(tmp_path),
            "--partition",
            "gpu",
            "--set",
            "train.epochs=2",
        ],
        env,
    )
    array = tmp_path / "train_array.sbatch"
    text = array.read_text()
    assert (
        "#SBATCH --array=0-11" in text
        and "#SBATCH --partition=gpu" in text
        and "#SBATCH --gres=gpu:1" in text
    )
    run(["bash", "-n", str(array)])
    run(["bash", "-n", str(tmp_path / "finalize.sbatch")])
    expected = [(d, m, k) for d in ("busi", "busbra") for m in ("unet", "unext") for k in range(3)]
    for index, (d, m, k) in enumerate(expected):
        cmd = run(
            ["bash", str(array)], {"SLURM_ARRAY_TASK_ID": str(index), "BUSBENCH_SWEEP_ECHO": "1"}
        ).stdout.strip()
        assert cmd.startswith("busbench train --config configs/experiments/benchmark.yaml")
        assert f"--fold {k} --set data.dataset={d} model.name={m} data.folds=3 experiment.name=cl" in cmd
        assert cmd.endswith("train.epochs=2")
    # the command the local sweep runs for that (dataset, model), restricted to the task's fold
    local = run(
        ["bash", "scripts/run_cnn.sh", "--dry-run", "--set", "train.epochs=2"], env
    ).stdout.splitlines()
    local_train = [line.strip() for line in local if line.startswith("busbench train")]
    for index, (_, _, k) in enumerate(expected):
        cmd = run(
            ["bash", str(array)], {"SLURM_ARRAY_TASK_ID": str(index), "BUSBENCH_SWEEP_ECHO": "1"}
        ).stdout.strip()
        assert cmd.replace(f" --fold {k} ", " ", 1) == local_train[index // 3]
    finalize = (tmp_path / "finalize.sbatch").read_text().splitlines()
    assert finalize[-1] == "busbench aggregate results/cl --out results/cl"
    assert sum(line.startswith("busbench test --run results/cl/") for line in finalize) == 4
