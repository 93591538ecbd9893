"""Results that must never be averaged or compared silently: ``busbench test`` on a run that lacks a fold model,
``busbench aggregate`` over a run whose summary lacks a fold, and runs whose manifests (splits) differ.

Each refusal is checked through the command line on real (tiny) trained and tested runs: one error line naming
the run and the fold or manifests, a non-zero exit, and earlier results left byte for byte as they were.
The same rules on hand-made summaries: ``tests/report/test_aggregate.py``; the evaluator's own refusals
(unfinished fold, changed manifest, another config): ``tests/engine/test_evaluate.py``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from busbench import cli
from busbench.data.manifest import manifest_sha256
from busbench.data.prepare import prepare

REPO = Path(__file__).resolve().parents[2]


def experiment_file(folder: Path, data_root: Path, out: Path, name: str) -> Path:
    """Two folds of a U-Net of base width 4 at 32 px, one epoch each: a complete run in a few seconds."""
    config = {
        "experiment": {"name": name},
        "data": {
            "dataset": "busi",
            "data_root": str(data_root),
            "image_size": 32,
            "folds": 2,
            "num_workers": 0,
            "cache": False,
        },
        "model": {"name": "unet", "params": {"base_width": 4}},
        "train": {"epochs": 1, "batch_size": 4},
        "eval": {"batch_size": 8},
        "output": {"root": str(out), "tensorboard": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train_and_test(config: Path, run_dir: Path) -> Path:
    assert cli.main(["train", "--config", str(config)]) == 0
    assert cli.main(["test", "--run", str(run_dir)]) == 0
    return run_dir


def one_error_line(capsys: pytest.CaptureFixture[str], command: str, *args: object) -> str:
    """Run ``busbench COMMAND ARGS``; it must fail with exactly one ``busbench COMMAND: error:`` line."""
    capsys.readouterr()
    code = cli.main([command, *map(str, args)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith(f"busbench {command}: error: "), err
    return lines[0].removeprefix(f"busbench {command}: error: ")


def files(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (relative path -> bytes), lock files aside."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def results(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two complete runs of one model on the same dataset: ``a`` on the prepared split, ``b`` on a re-split of the
    same images (another split seed, so another manifest)."""
    root = tmp_path_factory.mktemp("results")
    resplit = root / "resplit"
    prepare(
        ["busi"],
        data_root=resplit,
        raw_root=prepared / "raw",
        folds=2,
        test_size=0.25,
        seed=7,
        progress=False,
    )
    assert manifest_sha256(resplit / "manifests" / "busi.csv") != manifest_sha256(
        prepared / "manifests" / "busi.csv"
    )
    out = root / "results"
    with pytest.MonkeyPatch.context() as m:
        m.setenv("BUSBENCH_CONFIGS", os.fspath(REPO / "configs"))
        a = train_and_test(experiment_file(root, prepared, out, "a"), out / "a" / "busi" / "unet")
        b = train_and_test(experiment_file(root, resplit, out, "b"), out / "b" / "busi" / "unet")
    return {"a": a, "b": b, "root": root}


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def test_test_with_a_missing_fold_checkpoint_names_the_fold_and_keeps_earlier_scores(
    results, tmp_path, capsys
):
    run = copy_run(results["a"], tmp_path / "exp" / "busi" / "unet")
    (run / "fold1" / "checkpoint_best.pt").unlink()
    before = files(run)
    message = one_error_line(capsys, "test", "--run", run)
    assert message == (
        f"{run}: fold(s) [1] have no checkpoint_best.pt; data.folds=2 fold models are needed. "
        f"Train them first: busbench train --config {run / 'config.yaml'} --fold 1"
    )
    assert files(run) == before  # the summary.csv and test/ tables of the earlier complete test are untouched


def test_aggregate_refuses_a_run_missing_a_fold_and_writes_nothing(results, tmp_path, capsys):
    board = tmp_path / "board"
    assert cli.main(["aggregate", str(results["a"]), "--out", str(board)]) == 0
    before = files(board)
    assert pd.read_csv(board / "leaderboard.csv")["n_folds"].tolist() == [2]

    run = copy_run(results["a"], tmp_path / "partial" / "busi" / "unet")
    summary = pd.read_csv(run / "summary.csv", dtype={"fold": str})
    summary[summary["fold"] != "1"].to_csv(run / "summary.csv", index=False)  # fold 1's row is gone
    message = one_error_line(capsys, "aggregate", results["a"], run, "--out", board)
    assert f"{run} (busi): has fold models [0], lacks [1]" in message
    assert message.startswith("incomplete runs are not averaged") and "busbench train --fold" in message
    assert files(board) == before  # the earlier leaderboard is neither replaced nor mixed with a partial one


def test_aggregate_refuses_runs_on_different_manifests_unless_allowed(results, tmp_path, capsys):
    a, b = results["a"], results["b"]
    hashes = {
        name: pd.read_csv(run / "summary.csv")["manifest_sha256"].unique().tolist()
        for name, run in results.items()
        if name != "root"
    }
    assert len(hashes["a"]) == len(hashes["b"]) == 1 and hashes["a"] != hashes["b"]
    board = tmp_path / "board"
    message = one_error_line(capsys, "aggregate", a.parents[2], "--out", board)
    assert message.startswith("runs were tested on different manifests of the same dataset (busi: ")
    for name, run in (("a", a), ("b", b)):
        assert f"{hashes[name][0][:12]} ({run})" in message
    assert re.search(r"not comparable\. .*--allow-mixed", message)
    assert not board.exists()

    capsys.readouterr()
    assert cli.main(["aggregate", str(a.parents[2]), "--out", str(board), "--allow-mixed"]) == 0
    table = pd.read_csv(board / "leaderboard.csv")
    assert sorted(table["experiment"]) == ["a", "b"] and table["manifest_sha256"].nunique() == 2
    assert (table["n_folds"] == 2).all()
