"""Resume: a run interrupted after an epoch and restarted ends with exactly the weights, log and validation
results of a run that was never interrupted (CPU, bit for bit)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from engine_testdata import DEMO, tiny_config

from busbench import cli
from busbench.engine import checkpoint as ckpt
from busbench.engine import train as train_mod
from busbench.engine.train import train
from busbench.errors import ModelError

SETUPS = {
    "cosine-adamw": ("train.epochs=3", "train.warmup_epochs=1"),
    "plateau-sgd-accumulate": (
        "train.epochs=3",
        "train.scheduler=plateau",
        "train.optimizer=sgd",
        "train.accumulate=2",
        "train.grad_clip=0.5",
        "train.early_stopping=5",
        "data.num_workers=1",
    ),
}


def fold_dir(out: Path, fold: int = 0) -> Path:
    return out / "demo" / "busi" / "unet" / f"fold{fold}"


def batches_per_epoch(data_root: Path, fold: int = 0, batch_size: int = 4) -> int:
    manifest = pd.read_csv(data_root / "manifests" / "busi.csv")
    return int(((manifest["split"] == "dev") & (manifest["fold"] != fold)).sum()) // batch_size


def interrupt_after(monkeypatch: pytest.MonkeyPatch, n_batches: int) -> None:
    """Make the loss raise KeyboardInterrupt (as Ctrl-C would) on training batch ``n_batches + 1``."""
    real = train_mod.build_loss
    seen = {"n": 0}

    def build(cfg):
        loss = real(cfg)

        def forward(outputs, target):
            seen["n"] += 1
            if seen["n"] > n_batches:
                raise KeyboardInterrupt
            return loss(outputs, target)

        return forward

    monkeypatch.setattr(train_mod, "build_loss", build)


def assert_same_run(a: Path, b: Path) -> None:
    wa = ckpt.load_checkpoint(a / "checkpoint_last.pt")
    wb = ckpt.load_checkpoint(b / "checkpoint_last.pt")
    for key in wa["model"]:
        assert torch.equal(wa["model"][key], wb["model"][key]), key
    best_a = ckpt.load_checkpoint(a / "checkpoint_best.pt")
    best_b = ckpt.load_checkpoint(b / "checkpoint_best.pt")
    assert best_a["epoch"] == best_b["epoch"]
    for key in best_a["model"]:
        assert torch.equal(best_a["model"][key], best_b["model"][key]), key
    for name in ("train_log.csv", "val_per_image.csv"):
        ta, tb = pd.read_csv(a / name), pd.read_csv(b / name)
        ta, tb = ta.drop(columns=["seconds"], errors="ignore"), tb.drop(columns=["seconds"], errors="ignore")
        pd.testing.assert_frame_equal(ta, tb, check_exact=True)
    for key in ("best_dice", "best_epoch", "bad_rounds", "epoch"):
        assert wa[key] == wb[key], key
    assert wa["optimizer"]["state"].keys() == wb["optimizer"]["state"].keys()


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_interrupted_then_resumed_equals_uninterrupted(synthetic_root, tmp_path, monkeypatch, setup):
    overrides = SETUPS[setup]
    train(tiny_config(synthetic_root, tmp_path / "straight", *overrides), folds=[0])

    with monkeypatch.context() as m:
        interrupt_after(m, batches_per_epoch(synthetic_root))  # Ctrl-C in the first batch of epoch 2
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(synthetic_root, tmp_path / "resumed", *overrides), folds=[0])
    stopped = fold_dir(tmp_path / "resumed")
    assert ckpt.load_checkpoint(stopped / "checkpoint_last.pt")["epoch"] == 1
    assert not (stopped / "done.json").exists()
    assert json.loads((stopped / "run.json").read_text())["status"] == "interrupted"

    train(tiny_config(synthetic_root, tmp_path / "resumed", *overrides), folds=[0])
    assert_same_run(fold_dir(tmp_path / "straight"), stopped)
    info = json.loads((stopped / "run.json").read_text())
    assert [s["status"] for s in info["sessions"]] == ["interrupted", "completed"]
    assert info["sessions"][1]["resumed_from_epoch"] == 1
    assert len(pd.read_csv(stopped / "train_log.csv")) == 3


def test_ctrl_c_exits_130_with_a_message(synthetic_root, tmp_path, monkeypatch, capsys, caplog):
    interrupt_after(monkeypatch, batches_per_epoch(synthetic_root))
    args = [
        "train",
        "--config",
        str(DEMO),
        "--fold",
        "0",
        "--set",
        *[o for o in tiny_config_overrides(synthetic_root, tmp_path)],
    ]
    assert cli.main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    assert "checkpoint_last.pt holds epoch 1. Run the same command again to resume" in caplog.text
    assert ckpt.load_checkpoint(fold_dir(tmp_path) / "checkpoint_last.pt")["epoch"] == 1


def test_no_resume_starts_over(synthetic_root, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        interrupt_after(m, batches_per_epoch(synthetic_root))
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(synthetic_root, tmp_path, "train.epochs=2"), folds=[0])
    train(tiny_config(synthetic_root, tmp_path, "train.epochs=2"), folds=[0], resume=False)
    info = json.loads((fold_dir(tmp_path) / "run.json").read_text())
    assert [s["resumed_from_epoch"] for s in info["sessions"]] == [0]  # the earlier session's record is gone
    train(tiny_config(synthetic_root, tmp_path / "straight", "train.epochs=2"), folds=[0])
    assert_same_run(fold_dir(tmp_path / "straight"), fold_dir(tmp_path))


def test_checkpoint_of_another_setup_is_not_resumed(synthetic_root, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        interrupt_after(m, batches_per_epoch(synthetic_root))
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(synthetic_root, tmp_path, "train.epochs=2"), folds=[0])
    # the run directory's config.yaml is replaced by hand: the checkpoint no longer matches it
    cfg = tiny_config(synthetic_root, tmp_path, "train.epochs=2", "train.weight_decay=0.1")
    (fold_dir(tmp_path).parent / "config.yaml").unlink()
    with pytest.raises(ModelError, match="different training setup.*--no-resume"):
        train(cfg, folds=[0])


def tiny_config_overrides(data_root: Path, out: Path) -> list[str]:
    """The --set list equivalent to tiny_config(data_root, out)."""
    cfg = tiny_config(data_root, out)
    return [
        f"data.data_root={data_root}",
        f"output.root={out}",
        f"data.image_size={cfg.data.image_size}",
        f"data.folds={cfg.data.folds}",
        "model.params.base_width=4",
        f"train.epochs={cfg.train.epochs}",
        "train.batch_size=4",
        "eval.batch_size=8",
        "output.tensorboard=false",
    ]


def start_training_and_wait(out: Path, data_root: Path, epochs: int = 4) -> tuple[subprocess.Popen, Path]:
    """``busbench train`` in a subprocess; returns once fold 0's first checkpoint exists (or the process ended)."""
    sets = [*tiny_config_overrides(data_root, out), f"train.epochs={epochs}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "busbench.cli", "train", "--config", str(DEMO), "--fold", "0", "--set", *sets],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )
    last = fold_dir(out) / "checkpoint_last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc, last


def test_killed_process_resumes_to_the_same_weights(synthetic_root, tmp_path):
    """SIGKILL (no cleanup at all) right after the first epoch's checkpoint appears, then resume."""
    proc, last = start_training_and_wait(tmp_path / "killed", synthetic_root)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    proc.stderr.close()
    assert last.exists(), f"the first epoch never finished: {stderr[-2000:]}"
    killed_at = ckpt.load_checkpoint(last)["epoch"]
    assert 1 <= killed_at < 4
    assert not (last.parent / "done.json").exists()

    train(tiny_config(synthetic_root, tmp_path / "killed", "train.epochs=4"), folds=[0])
    train(tiny_config(synthetic_root, tmp_path / "straight", "train.epochs=4"), folds=[0])
    assert_same_run(fold_dir(tmp_path / "straight"), last.parent)
    sessions = json.loads((last.parent / "run.json").read_text())["sessions"]
    assert [s["status"] for s in sessions] == ["killed", "completed"]
    assert sessions[1]["resumed_from_epoch"] == killed_at


def test_sigterm_stops_like_ctrl_c(synthetic_root, tmp_path):
    """A batch scheduler's SIGTERM: exit status 130, the run recorded as interrupted, a one-line reason."""
    proc, last = start_training_and_wait(tmp_path, synthetic_root, epochs=20)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    proc.stderr.close()
    assert code == 130, stderr[-2000:]
    assert "Run the same command again to resume" in stderr
    info = json.loads((last.parent / "run.json").read_text())
    assert info["status"] == "interrupted"
    assert 1 <= ckpt.load_checkpoint(last)["epoch"] < 20
