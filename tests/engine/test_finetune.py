"""Fine-tuning from another run (``train.init_from``) and freezing the encoder (``train.freeze_encoder``).

A tiny U-Net is trained on synthetic BUSI (two folds, one epoch) and serves as the source; the fine-tuned runs train
on synthetic BUSBRA's folds."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from engine_testdata import tiny_config

from busbench.data.prepare import prepare
from busbench.data.synth import synthesize
from busbench.engine import checkpoint as ckpt
from busbench.engine.finetune import freeze_encoder, source_checkpoint
from busbench.engine.train import build_model, train
from busbench.errors import ConfigError, ModelError


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("busi_busbra")
    synthesize("busi", root / "raw" / "BUSI", n=20, seed=1)
    synthesize("busbra", root / "raw" / "BUSBRA", n=20, seed=2)
    prepare(["busi", "busbra"], data_root=root, folds=2, test_size=0.25, progress=False)
    return root


@pytest.fixture(scope="module")
def source_run(two_datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("source")
    train(tiny_config(two_datasets, out, "train.epochs=1"))
    return out / "demo" / "busi" / "unet"


def _encoder_keys(cfg) -> set[str]:
    model = build_model(cfg)
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = tuple(names[id(m)] + "." for m in model.encoder_modules())
    return {k for k in model.state_dict() if k.startswith(prefixes)}


def test_frozen_encoder_keeps_the_source_encoder_and_trains_the_rest(two_datasets, source_run, tmp_path):
    cfg = tiny_config(
        two_datasets,
        tmp_path,
        "data.dataset=busbra",
        "experiment.name=ft",
        f"train.init_from={source_run}",
        "train.freeze_encoder=true",
        "train.epochs=2",
    )
    (fold_dir,) = train(cfg, folds=[0])
    source = ckpt.load_checkpoint(source_run / "fold0" / ckpt.BEST)["model"]
    tuned = ckpt.load_checkpoint(fold_dir / ckpt.LAST)["model"]
    encoder = _encoder_keys(cfg)
    assert any(k.endswith("running_mean") for k in encoder)  # BatchNorm statistics are part of the check
    for key in encoder:
        assert torch.equal(source[key], tuned[key]), f"frozen {key} changed"
    decoder = [k for k in source if k not in encoder and source[k].is_floating_point()]
    assert decoder and all(not torch.equal(source[k], tuned[k]) for k in decoder if "weight" in k)

    info = json.loads((fold_dir / "run.json").read_text())
    start = info["init_from"]
    assert Path(start["path"]) == source_run / "fold0" / ckpt.BEST
    assert start["sha256"] == hashlib.sha256(Path(start["path"]).read_bytes()).hexdigest()
    assert info["frozen_params"] == sum(
        p.numel() for m in build_model(cfg).encoder_modules() for p in m.parameters()
    )


def test_each_fold_starts_from_the_matching_source_fold(two_datasets, source_run, tmp_path):
    # a learning rate so small that the weights stay where they started, to tell which source fold that was
    cfg = tiny_config(
        two_datasets,
        tmp_path,
        "data.dataset=busbra",
        "experiment.name=ft0",
        f"train.init_from={source_run}",
        "train.lr=1e-9",
        "train.min_lr=1e-10",
        "train.epochs=1",
    )
    folds = train(cfg)
    sources = [ckpt.load_checkpoint(source_run / f"fold{k}" / ckpt.BEST)["model"] for k in (0, 1)]
    for k, fold_dir in enumerate(folds):
        tuned = ckpt.load_checkpoint(fold_dir / ckpt.LAST)["model"]
        weights = [key for key in tuned if key.endswith("weight") and tuned[key].ndim == 4]
        gap = [max(float((tuned[w] - src[w]).abs().max()) for w in weights) for src in sources]
        assert gap[k] < 1e-6 < gap[1 - k]


def test_source_checkpoint_rules(source_run, tmp_path):
    best = source_run / "fold1" / ckpt.BEST
    assert source_checkpoint(best, fold=0, folds=5) == best  # a file: every fold
    assert source_checkpoint(source_run / "fold1", fold=0, folds=5) == best  # a fold folder: every fold
    assert source_checkpoint(source_run, fold=1, folds=2) == best  # same fold count: the same fold
    assert source_checkpoint(source_run, fold=1, folds=3) == source_run / "fold0" / ckpt.BEST  # else fold 0

    copy = tmp_path / "copy"
    shutil.copytree(source_run, copy)
    (copy / "fold1" / "done.json").unlink()
    with pytest.raises(ConfigError, match=r"fold 1 of .* has not finished training.*--fold 1"):
        source_checkpoint(copy, fold=1, folds=2)
    with pytest.raises(ConfigError, match="does not exist"):
        source_checkpoint(tmp_path / "nowhere", fold=0, folds=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither config.yaml"):
        source_checkpoint(tmp_path / "empty", fold=0, folds=2)


def test_missing_source_fails_before_anything_is_written(two_datasets, tmp_path):
    cfg = tiny_config(two_datasets, tmp_path, f"train.init_from={tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match="train.init_from"):
        train(cfg)
    assert not (tmp_path / "demo").exists()


def test_source_of_another_architecture_is_a_model_error(two_datasets, source_run, tmp_path):
    cfg = tiny_config(
        two_datasets, tmp_path, f"train.init_from={source_run}", "model.params.base_width=8", "train.epochs=1"
    )
    with pytest.raises(ModelError, match=r"train.init_from.*does not fit"):
        train(cfg, folds=[0])


def test_freezing_needs_a_named_encoder():
    with pytest.raises(ConfigError, match="does not name its encoder"):
        freeze_encoder(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3)))


def test_fine_tuning_is_another_training_setup(two_datasets, source_run, tmp_path):
    plain = tiny_config(two_datasets, tmp_path)
    tuned = tiny_config(two_datasets, tmp_path, f"train.init_from={source_run}")
    frozen = tiny_config(two_datasets, tmp_path, f"train.init_from={source_run}", "train.freeze_encoder=true")
    assert len({ckpt.training_hash(c) for c in (plain, tuned, frozen)}) == 3
