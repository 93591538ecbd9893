"""Transfer learning: start training from another run's weights and, optionally, freeze the encoder.

Config keys (both part of the training setup, so they are in the config hash):

``train.init_from``
    ``null`` (default: the model's own initialisation) or a path, relative to the working directory:

    * a **run folder** of ``busbench train`` (holding ``config.yaml`` and ``fold<k>/``): fold k of the new run starts
      from that run's ``fold<k>/checkpoint_best.pt`` when both runs have the same ``data.folds``, and every fold starts
      from the source's ``fold0/checkpoint_best.pt`` when the fold counts differ. The source folds must be finished
      (``done.json``). Matching folds keep fine-tuning as independent per fold as the source training was;
    * a **fold folder** (holding ``checkpoint_best.pt``) or a **checkpoint file** (``.pt`` written by busbench): every
      fold starts from it.

    The checkpoint must fit the configured model exactly (same ``model.name``, ``model.params``, ``data.channels``,
    and ``data.image_size`` for models with size-bound position embeddings); anything else is a ModelError naming
    the file. Only the weights are taken: optimiser, schedule and epoch counter start fresh. ``run.json`` records
    which checkpoint each fold started from, with its SHA-256.

    Leakage: the test split of the new run's dataset is held out only from the new training. When the source run
    was trained on images of that test split (e.g. BUSI and Curated BUSI share images), the fine-tuned scores are
    optimistic; with differing fold counts the same holds for the validation folds.

``train.freeze_encoder``
    ``true`` freezes the modules ``model.encoder_modules()`` names: their parameters get ``requires_grad=False`` (the
    optimiser never sees them, weight decay included) and the modules stay in eval mode whenever the model is put in
    training mode, so BatchNorm running statistics and dropout in the encoder do not change either. Works for every
    registered model; combined with ``init_from`` it is the classic "train the decoder on the new dataset" setup, and
    with an ImageNet encoder (``model.params.encoder_weights``) a linear-probe-like baseline.
"""

from __future__ import annotations

import hashlib
import types
from pathlib import Path
from typing import Any

from torch import nn

from busbench.engine import checkpoint as ckpt
from busbench.engine.results import RUN_LAYOUT
from busbench.errors import ConfigError, ModelError

RUN_CONFIG = "config.yaml"
DONE = "done.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_checkpoint(init_from: str | Path, fold: int, folds: int) -> Path:
    """The checkpoint fold ``fold`` (of ``folds``) starts from, following the rules in the module docstring."""
    path = Path(init_from)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(
            f"config key 'train.init_from' is {str(init_from)!r}, which does not exist; give a run folder of "
            "busbench train, a fold folder or a checkpoint_best.pt file"
        )
    if (path / ckpt.BEST).is_file():
        return path / ckpt.BEST
    if not (path / RUN_CONFIG).is_file():
        raise ConfigError(
            f"config key 'train.init_from': {path} holds neither {RUN_CONFIG} (a run folder) nor {ckpt.BEST} (a fold "
            f"folder); point it at {RUN_LAYOUT} or one of its fold<k> folders"
        )
    from busbench.config import config_from_file

    source_folds = config_from_file(path / RUN_CONFIG).data.folds
    k = fold if source_folds == folds else 0
    fold_dir = path / f"fold{k}"
    if not (fold_dir / ckpt.BEST).is_file() or not (fold_dir / DONE).is_file():
        raise ConfigError(
            f"config key 'train.init_from': fold {k} of {path} has not finished training (needs {fold_dir / ckpt.BEST} "
            f"and {fold_dir / DONE}); train it first: busbench train --config {path / RUN_CONFIG} --fold {k}"
        )
    return fold_dir / ckpt.BEST


def load_initial_weights(model: nn.Module, init_from: str | Path, fold: int, folds: int) -> dict[str, Any]:
    """Copy the source checkpoint's weights into ``model``; returns what ``run.json`` records about it."""
    path = source_checkpoint(init_from, fold, folds)
    payload = ckpt.load_checkpoint(path)
    try:
        ckpt.load_model_state(model, payload, path)
    except ModelError as exc:
        raise ModelError(f"config key 'train.init_from': {exc}") from None
    return {
        "path": str(path),
        "sha256": _sha256(path),
        "model_name": payload.get("model_name"),
        "config_hash": payload.get("config_hash"),
        "epoch": payload.get("epoch"),
        "fold": payload.get("fold"),
    }


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a frozen module: always eval mode (BatchNorm statistics and dropout stay fixed)."""
    return nn.Module.train(self, False)


def encoder_modules(model: nn.Module) -> list[nn.Module]:
    """The modules ``model.encoder_modules()`` names; ConfigError when the model does not name any."""
    target = ckpt.unwrap(model)
    getter = getattr(target, "encoder_modules", None)
    try:
        modules = list(getter()) if callable(getter) else []
    except NotImplementedError:
        modules = []
    if not modules:
        raise ConfigError(
            f"config key 'train.freeze_encoder' is true but {type(target).__name__} does not name its encoder "
            "(encoder_modules()); set train.freeze_encoder=false for this model"
        )
    return modules


def freeze_encoder(model: nn.Module) -> int:
    """Freeze the encoder of ``model`` (see the module docstring); returns the number of frozen parameters."""
    frozen: dict[int, int] = {}
    for module in encoder_modules(model):
        module.requires_grad_(False)
        module.train = types.MethodType(_stay_in_eval, module)  # type: ignore[method-assign]
        module.eval()
        frozen.update({id(p): p.numel() for p in module.parameters()})
    return sum(frozen.values())


def prepare_model(model: nn.Module, cfg: Any, fold: int) -> dict[str, Any]:
    """Apply ``train.init_from`` and ``train.freeze_encoder`` to a freshly built model; returns provenance."""
    t = cfg.train
    info: dict[str, Any] = {}
    if t.init_from:
        info["init_from"] = load_initial_weights(model, t.init_from, fold, cfg.data.folds)
    if t.freeze_encoder:
        info["frozen_params"] = freeze_encoder(model)
    return info


def check_source(cfg: Any, folds: list[int]) -> None:
    """Fail before anything is written when ``train.init_from`` cannot serve the folds about to be trained."""
    if cfg.train.init_from:
        for fold in folds:
            source_checkpoint(cfg.train.init_from, fold, cfg.data.folds)
