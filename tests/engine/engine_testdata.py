"""Helpers for the engine tests: a small synthetic BUSI-layout dataset, prepared once per session, and tiny
run configurations (32 px, a 4-channel-wide U-Net, two folds) that train in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from busbench.config import Config, load_config
from busbench.data.prepare import prepare
from busbench.data.synth import synthesize
from busbench.engine import distributed

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "experiments" / "demo.yaml"


def prepare_synthetic(root: Path, n: int = 24, folds: int = 2, seed: int = 0) -> Path:
    """Synthesize ``n`` BUSI-layout images under ``root/raw`` and prepare them; returns the data root."""
    synthesize("busi", root / "raw" / "BUSI", n=n, seed=seed)
    prepare(["busi"], data_root=root, folds=folds, test_size=0.25, seed=42, progress=False)
    return root


def tiny_config(data_root: Path, out_root: Path, *overrides: str) -> Config:
    """The demo experiment shrunk to seconds: 32 px, base width 4, 2 folds, 2 epochs, no TensorBoard."""
    return load_config(
        DEMO,
        [
            f"data.data_root={data_root}",
            f"output.root={out_root}",
            "data.image_size=32",
            "data.folds=2",
            "model.params.base_width=4",
            "train.epochs=2",
            "train.batch_size=4",
            "eval.batch_size=8",
            "output.tensorboard=false",
            *overrides,
        ],
    )


def interrupt_in_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Ctrl-C at the end of training epoch ``epoch``, before its checkpoint is written."""
    real, calls = distributed.mean_across_ranks, {"n": 0}

    def stop(value):
        calls["n"] += 1
        if calls["n"] == epoch:
            raise KeyboardInterrupt
        return real(value)

    monkeypatch.setattr(distributed, "mean_across_ranks", stop)
