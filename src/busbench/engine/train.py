"""``busbench train``: the shared trainer for every model and dataset.

One call trains the folds of one experiment; each fold is independent and lands in
``<output.root>/<experiment>/<dataset>/<model>/fold<k>/``:

==========================  ===================================================================================
``checkpoint_last.pt``      full training state after the latest finished epoch (resume point)
``checkpoint_best.pt``      weights of the epoch with the best validation Dice (the validation fold only;
                            the test split is never read during training)
``val_per_image.csv``       per-image validation metrics of that best epoch (same metrics as the test)
``train_log.csv``           one row per epoch: epoch, lr, train_loss, val_dice, val_iou, val_hd95, seconds
``tensorboard/``            scalars and validation overlays (``output.tensorboard``, ``output.overlays``)
``run.json``                provenance: versions, git commit, device, manifest hashes, seeds, sessions
``done.json``               written last; a fold holding it is skipped when the command is run again
==========================  ===================================================================================

The resolved configuration is written once per run to ``<model dir>/config.yaml``. Training into a run directory
whose ``config.yaml`` describes a different training setup is refused (pick a new ``experiment.name``, or pass
``--force`` to delete the earlier results); changes that do not affect the weights (``eval.*``, ``output.*``,
``data.num_workers``, ``data.data_root``) are allowed.

Behaviour worth knowing:

* Seeding: every fold starts from ``train.seed`` (Python, NumPy, torch, the DataLoader generator and its workers),
  so ``--fold K`` alone gives the same weights as fold K of a full run.
* Schedules are stepped once per optimiser step (cosine and poly decay smoothly to ``train.min_lr`` after a linear
  warmup of ``train.warmup_epochs``); ``plateau`` halves the rate after 5 validation rounds without a better Dice
  (never below ``min_lr``); ``none`` keeps ``train.lr`` after warmup.
* Resume is automatic: when ``checkpoint_last.pt`` exists, training continues after its epoch with the model,
  optimiser, scheduler, gradient scaler, RNG states, best score and early-stopping counter restored, and ends with
  the same weights as an uninterrupted run (on the CPU, bit for bit). ``--no-resume`` starts the folds over.
* Early stopping counts validation rounds without a better validation Dice (``train.early_stopping``).
* ``train.accumulate``: one optimiser step per that many batches, each batch's loss divided by the number of
  batches in its step, so an epoch that ends with a shorter step still takes the mean of that step's batches.
* Mixed precision (CUDA): ``train.amp=bf16`` on GPUs with native bfloat16, float16 with gradient scaling on older
  ones (:func:`busbench.engine.inference.amp_dtype`); ``checkpoint_last.pt`` records the precision, and a
  checkpoint resumed on a device of another precision resumes with a fresh gradient scaler and a warning.
* A non-finite training loss stops the run with an error, keeping the last good checkpoint. Ctrl-C (or SIGTERM from
  a batch scheduler) stops at once: ``checkpoint_last.pt`` always holds the latest *finished* epoch (it is written
  atomically at every epoch end, so there is nothing half-written to save), ``run.json`` records the interruption,
  the command exits with status 130, and rerunning it resumes after that epoch. A partial epoch is never saved:
  resuming from the middle of an epoch could not reproduce the uninterrupted run.
* Two processes never train the same fold: each fold folder is locked while it trains (``busbench.locking``).
* ``task.mode`` (binary, multiclass, multitask) and ``train.strategy`` (standard, adversarial_ds) change the network's
  outputs, the loss and the updates (:mod:`busbench.engine.tasks`); ``checkpoint_last.pt`` then also holds the
  discriminators and their optimiser. The best checkpoint is chosen by the binary lesion Dice of the validation
  fold in every mode (multi-class: lesion = 1 - p(background); multitask: after refinement), so every method is
  selected by the same rule; ``val_per_image.csv`` carries the mode's extra columns.
* ``train.init_from`` starts each fold from another run's weights and ``train.freeze_encoder`` keeps
  ``model.encoder_modules()`` fixed (:mod:`busbench.engine.finetune`).
* ``torchrun --nproc_per_node N -m busbench train ...`` trains with N processes (DistributedDataParallel):
  ``train.batch_size`` stays the global batch, rank 0 writes every file, and runs and checkpoints are those of the
  single-process command (:mod:`busbench.engine.distributed`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

import busbench
import busbench.engine.distributed as distributed
import busbench.engine.finetune as finetune
from busbench.atomic import atomic_write_text, remove_stale_temporaries
from busbench.config import Config, config_from_file, load_config, save_config
from busbench.engine import checkpoint as ckpt
from busbench.engine import tasks, trackers
from busbench.engine.inference import amp_dtype, autocast, resolve_device
from busbench.engine.runlog import (
    LOG,
    RunRecord,
    TensorBoardLog,
    data_split_provenance,
    ensure_console_logging,
    environment,
    now,
    overlay,
    split_seed,
    write_train_log,
)
from busbench.engine.seeding import device_rng_state, rng_state, seed_everything, set_rng_state
from busbench.errors import BusbenchError, ConfigError, ModelError
from busbench.locking import LOCK_NAME, locked
from busbench.losses import build_loss
from busbench.metrics import per_image_batch, summarize

CONFIG_FILE = "config.yaml"
DONE_FILE = "done.json"
PLATEAU_PATIENCE = 5
PLATEAU_FACTOR = 0.5
POLY_POWER = 0.9
LABEL_NAMES = ("normal", "benign", "malignant")


class TrainingDiverged(BusbenchError):
    """The training loss became NaN or infinite."""


# --------------------------------------------------------------------------------------------------------------
# run directory


def prepare_run_dir(cfg: Config, run_dir: Path, force: bool = False) -> None:
    """Write ``config.yaml`` into ``run_dir``, refusing a directory trained with a different setup."""
    path = run_dir / CONFIG_FILE
    if path.is_file():
        old = config_from_file(path)
        if ckpt.training_hash(old) != ckpt.training_hash(cfg):
            shown = ckpt.describe(ckpt.config_differences(ckpt.training_dict(old), ckpt.training_dict(cfg)))
            if not force:
                raise ConfigError(
                    f"{path} holds results of a different training setup ({shown}). Set a new experiment.name "
                    f"(e.g. --set experiment.name={cfg.experiment.name}-2) to keep both, or pass --force to delete "
                    f"the earlier results in {run_dir}"
                )
            LOG.warning("--force: deleting earlier results in %s (%s)", run_dir, shown)
            for child in sorted(run_dir.iterdir()):
                if child.is_dir() and (child.name.startswith("fold") or child.name == "test"):
                    shutil.rmtree(child)
                elif child.is_file() and child.name != LOCK_NAME:
                    child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path)


# --------------------------------------------------------------------------------------------------------------
# data


def _data_api():
    from busbench.data import loader

    return loader


def check_data(cfg: Config) -> dict[str, str]:
    """Refuse leaking splits before any training starts; returns each dataset's manifest hash."""
    from busbench.data import audit

    loader = _data_api()
    hashes = {}
    for key in cfg.data.datasets:
        _, info = loader.load_dataset_rows(cfg, key)
        if len(info["folds"]) != cfg.data.folds:
            raise ConfigError(
                f"config key 'data.folds' is {cfg.data.folds} but {info['manifest']} was prepared with "
                f"{len(info['folds'])} folds; set data.folds={len(info['folds'])} or re-run busbench prepare "
                f"--datasets {key} --folds {cfg.data.folds}"
            )
        audit.check_manifest(info["manifest"], data_root=info["data_root"])
        hashes[key] = str(info["manifest_sha256"])
    return hashes


def sample_table(ds: Any, indices: Sequence[int]) -> pd.DataFrame:
    """``sample_id, dataset_key, label`` of dataset items ``indices`` (from the manifest rows the dataset holds)."""
    rows = ds.rows.iloc[list(indices)]
    return pd.DataFrame(
        {
            "sample_id": rows["sample_id"].astype(str).to_numpy(),
            "dataset_key": rows["dataset"].astype(str).to_numpy(),
            "label": rows["label"].astype(str).to_numpy(),
        }
    )


# --------------------------------------------------------------------------------------------------------------
# optimisation


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True
        )
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def lr_factor(step: int, cfg: Config, steps_per_epoch: int) -> float:
    """Multiplier of ``train.lr`` after ``step`` optimiser steps (warmup, then the chosen decay)."""
    t = cfg.train
    warm = t.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if t.scheduler in ("none", "plateau"):
        return 1.0
    total = max(1, t.epochs * steps_per_epoch - warm)
    progress = min(1.0, (step - warm) / total)
    floor = min(t.min_lr / t.lr, 1.0)
    decay = (
        0.5 * (1.0 + math.cos(math.pi * progress))
        if t.scheduler == "cosine"
        else (1.0 - progress) ** POLY_POWER
    )
    return floor + (1.0 - floor) * decay


class Schedule:
    """The learning-rate schedule: a per-step ``LambdaLR`` plus ``ReduceLROnPlateau`` for ``plateau``."""

    def __init__(self, cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> None:
        self.warm = cfg.train.warmup_epochs * steps_per_epoch
        self.plateau_mode = cfg.train.scheduler == "plateau"
        self.steps = 0
        self.per_step = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg, steps_per_epoch)
        )
        self.plateau = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                mode="max",
                factor=PLATEAU_FACTOR,
                patience=PLATEAU_PATIENCE,
                min_lr=cfg.train.min_lr,
            )
            if self.plateau_mode
            else None
        )

    def step(self) -> None:
        """After each optimiser step. Under ``plateau`` the per-step part only runs the warmup."""
        self.steps += 1
        if not self.plateau_mode or self.steps <= self.warm:
            self.per_step.step()

    def validated(self, dice: float) -> None:
        if self.plateau is not None and self.steps >= self.warm:
            self.plateau.step(dice)

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "per_step": self.per_step.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.per_step.load_state_dict(state["per_step"])
        if self.plateau is not None and state.get("plateau") is not None:
            self.plateau.load_state_dict(state["plateau"])


# --------------------------------------------------------------------------------------------------------------
# one fold


def build_model(cfg: Config) -> nn.Module:
    """The configured network, shaped for ``task.mode`` (:mod:`busbench.engine.tasks`); ModelError for an unknown
    name, bad params or an input size it cannot take."""
    return tasks.build_model(cfg)


class FoldTrainer:
    """Trains one fold; its attributes are exactly the state a checkpoint holds."""

    def __init__(
        self, cfg: Config, fold: int, fold_dir: Path, device: torch.device, manifest_hashes: dict[str, str]
    ):
        self.cfg = cfg
        self.fold = fold
        self.dir = fold_dir
        self.device = device
        self.manifest_hashes = manifest_hashes
        self.dtype = amp_dtype(device, cfg.train.amp)
        self.config_hash = ckpt.training_hash(cfg)
        self.setup = ckpt.setup_fields(cfg)
        self.task = tasks.build_task(cfg)

        loader_api = _data_api()
        t = cfg.train
        self.train_ds, self.val_ds = loader_api.build_datasets(cfg, fold)
        if len(self.train_ds) == 0 or len(self.val_ds) == 0:
            raise ConfigError(
                f"fold {fold} has {len(self.train_ds)} training and {len(self.val_ds)} validation images; "
                "each fold needs both - check data.folds against the prepared manifest"
            )
        seed_everything(t.seed, t.deterministic)
        self.model = self._build_model().to(device)
        # train.init_from and train.freeze_encoder (busbench.engine.finetune)
        self.init_info = finetune.prepare_model(self.model, cfg, fold)
        self.model = distributed.prepare_model(self.model, device)
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        epoch_items = self.task.train_indices(self.train_ds)  # task.oversample: repeated training items
        self.train_loader = loader_api.make_loader(
            self.train_ds,
            t.batch_size,
            shuffle=True,
            seed=t.seed,
            num_workers=cfg.data.num_workers,
            drop_last=len(self.train_ds) >= t.batch_size,
            sampler=None
            if epoch_items is None
            else loader_api.EpochSampler(len(self.train_ds), True, t.seed, indices=epoch_items),
        )
        self.val_loader = loader_api.make_loader(
            self.val_ds,
            cfg.eval.batch_size,
            shuffle=False,
            seed=t.seed,
            num_workers=cfg.data.num_workers,
        )
        self.dist = distributed.context()
        if self.dist.active:  # this process's share of every batch (busbench.engine.distributed)
            self.train_loader = distributed.train_loader(
                self.dist, self.train_ds, t.batch_size, t.seed, cfg.data.num_workers, indices=epoch_items
            )
            self.val_loader = distributed.eval_loader(
                self.dist, self.val_ds, cfg.eval.batch_size, t.seed, cfg.data.num_workers
            )
        self.steps_per_epoch = max(1, math.ceil(len(self.train_loader) / t.accumulate))
        self.criterion = self.task.criterion(build_loss)
        self.optimizer = build_optimizer(cfg, self.model)
        self.strategy = tasks.build_strategy(cfg, self.model, self.optimizer, device)
        self.schedule = Schedule(cfg, self.optimizer, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.epoch = 0  # finished epochs
        self.saved_epoch = 0  # the epoch checkpoint_last.pt holds
        self.best_dice = -math.inf
        self.best_epoch = 0
        self.bad_rounds = 0
        self.finished = False
        self.stop_reason = ""
        self.train_seconds = 0.0
        self.history: list[dict[str, Any]] = []
        self.forward = self.model
        self.params_m = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values()) / 1e6

    def _build_model(self) -> nn.Module:
        return build_model(self.cfg)

    # ---- checkpoint state

    def state(self) -> dict[str, Any]:
        return {
            **self.setup,
            "model_name": self.cfg.model.name,
            "fold": self.fold,
            "epoch": self.epoch,
            "model": ckpt.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "precision": _precision(self.dtype),
            # each rank's CUDA generator: a collective, so every rank builds the state (rank 0 writes it)
            "rng": rng_state(self.train_loader.generator, distributed.gather_lists([device_rng_state()])),
            "best_dice": self.best_dice,
            "best_epoch": self.best_epoch,
            "bad_rounds": self.bad_rounds,
            "finished": self.finished,
            "stop_reason": self.stop_reason,
            "train_seconds": self.train_seconds,
            "history": self.history,
            **({"strategy": self.strategy.state_dict()} if self.strategy is not None else {}),
        }

    def restore(self, path: Path) -> None:
        payload = ckpt.load_checkpoint(path)
        diffs = ckpt.setup_differences(payload, self.cfg)
        if diffs:
            raise ModelError(
                f"{path} was written by a different training setup ({ckpt.describe(diffs)}); rerun with "
                "--no-resume to train the fold from scratch"
            )
        ckpt.load_model_state(self.model, payload, path)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.schedule.load_state_dict(payload["scheduler"])
        self._restore_scaler(payload, path)
        if self.strategy is not None:
            self.strategy.load_state_dict(payload.get("strategy"), path)
        set_rng_state(payload["rng"], self.train_loader.generator, rank=self.dist.rank)
        self.epoch = self.saved_epoch = int(payload["epoch"])
        self.best_dice = float(payload["best_dice"])
        self.best_epoch = int(payload["best_epoch"])
        self.bad_rounds = int(payload["bad_rounds"])
        self.finished = bool(payload["finished"])
        self.stop_reason = str(payload["stop_reason"])
        self.train_seconds = float(payload["train_seconds"])
        self.history = list(payload["history"])

    def _restore_scaler(self, payload: dict[str, Any], path: Path) -> None:
        """The gradient scaler's state, when both runs scale (float16); a change of precision is logged.

        The precision follows the device (``train.amp`` is the same, or the setup check above would have refused):
        a checkpoint written on the CPU or on a GPU with native bfloat16 holds no scaler state, and one written
        with float16 holds a state a float32 or bfloat16 run has no use for. Either way the scaler starts afresh.
        """
        saved = payload.get("precision")
        if saved is not None and saved != _precision(self.dtype):
            LOG.warning(
                "fold %d: %s was trained in %s, this device trains in %s; resuming in %s (the result will differ "
                "slightly from a run without the change)",
                self.fold,
                path,
                saved,
                _precision(self.dtype),
                _precision(self.dtype),
            )
        state = payload.get("scaler") or {}
        if self.scaler.is_enabled() and state:
            self.scaler.load_state_dict(state)

    # ---- loops

    def train_epoch(self) -> float:
        t = self.cfg.train
        self.forward.train()
        self.train_loader.sampler.set_epoch(
            self.epoch
        )  # order and augmentation are functions of (seed, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        n_batches = len(self.train_loader)
        bar = tqdm(
            self.train_loader,
            total=n_batches,
            disable=None,
            leave=False,
            dynamic_ncols=True,
            desc=f"fold {self.fold} epoch {self.epoch + 1}/{t.epochs}",
        )
        for i, batch in enumerate(bar):
            # the micro-batches of one optimiser step: train.accumulate of them, fewer in the epoch's last step
            group = min(t.accumulate, n_batches - (i // t.accumulate) * t.accumulate)
            step_now = (i + 1) % t.accumulate == 0 or i + 1 == n_batches
            # uint8 as loaded; normalised and cast on the device, as validation and testing do
            x, y = _data_api().device_batch(batch, self.cfg.data.normalize, self.device, t.channels_last)
            if self.strategy is not None:  # its own generator and discriminator updates
                loss_sum += self.strategy.step(self.forward, x, y, self.device, self.dtype, self.scaler)
                self.schedule.step()
                continue
            # under DDP only the step's last micro-batch all-reduces; each is weighted 1/group, so the step's
            # gradient is the mean over its micro-batches also when the epoch ends with a shorter step
            with distributed.gradient_sync(self.forward, step_now):
                with autocast(self.device, self.dtype):
                    out = self.task.outputs(self.forward, x, y, batch)
                loss = self.task.loss(self.criterion, out, batch, y)
                self.scaler.scale(loss / group).backward()
            loss_sum += loss.detach()
            if step_now:
                if t.grad_clip is not None:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.schedule.step()
        bar.close()
        mean_loss = float(distributed.mean_across_ranks(loss_sum)) / max(1, n_batches)
        if not math.isfinite(mean_loss):
            kept = (
                f"{self.dir / ckpt.LAST} keeps the last good epoch ({self.epoch})"
                if self.epoch
                else "no epoch had finished, so nothing was saved"
            )
            # a changed train.* key is a new training setup: the run folder takes it only with --force
            raise TrainingDiverged(
                f"fold {self.fold}: the training loss became {mean_loss} during epoch {self.epoch + 1}; stopped. "
                f"{kept}. Lower train.lr, set train.grad_clip or use train.amp=none, then train again under a new "
                "experiment.name (or add --force to replace this run)"
            )
        return mean_loss

    def validate(self) -> tuple[dict[str, float], pd.DataFrame, list[np.ndarray]]:
        """Per-image metrics on the validation fold, their summary, and overlays of the first images."""
        self.forward.eval()
        e = self.cfg.eval
        tables, overlays = [], []
        for batch in self.val_loader:
            predicted = self.task.predict(
                [distributed.unwrap(self.forward)],
                batch["image"],
                self.device,
                self.dtype,
                channels_last=self.cfg.train.channels_last,
            )
            predicted = self.task.finalize(predicted, e.threshold)  # the same masks the test scores
            pred = (predicted.lesion[0] >= e.threshold).numpy()
            gt = batch["mask"][:, 0].numpy() >= 0.5
            scores = pd.DataFrame(per_image_batch(pred, gt, hd95_mode=e.hd95_mode, workers=e.workers))
            extra = self.task.batch_columns(predicted, 0, batch, e.threshold)
            index = batch["index"].tolist()
            tables.append(pd.concat([sample_table(self.val_ds, index), scores, extra], axis=1))
            for j in range(len(index)):
                if len(overlays) < self.cfg.output.overlays:
                    overlays.append(overlay(batch["image"][j].numpy().mean(axis=0), gt[j], pred[j]))
        per_image = distributed.gather_frames(
            pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
        )
        return summarize(per_image), per_image, overlays

    def run(self, record: RunRecord, tb: TensorBoardLog) -> None:
        t = self.cfg.train
        while not self.finished:
            start = time.perf_counter()
            train_loss = self.train_epoch()
            self.epoch += 1
            lr = self.optimizer.param_groups[0]["lr"]
            row: dict[str, Any] = {
                "epoch": self.epoch,
                "lr": lr,
                "train_loss": train_loss,
                "val_dice": None,
                "val_iou": None,
                "val_hd95": None,
            }
            improved = False
            if self.epoch % t.val_every == 0 or self.epoch == t.epochs:
                summary, per_image, overlays = self.validate()
                row.update(val_dice=summary["dice"], val_iou=summary["iou"], val_hd95=summary["hd95"])
                self.schedule.validated(summary["dice"])
                if summary["dice"] > self.best_dice:
                    improved = True
                    self.best_dice, self.best_epoch, self.bad_rounds = summary["dice"], self.epoch, 0
                    per_image.insert(0, "epoch", self.epoch)
                    if self.dist.is_main:
                        _write_csv(self.dir / "val_per_image.csv", per_image)
                else:
                    self.bad_rounds += 1
                tb.overlays(overlays, self.epoch)
                if t.early_stopping is not None and self.bad_rounds >= t.early_stopping:
                    self.finished, self.stop_reason = True, f"early stopping after epoch {self.epoch}"
            if self.epoch >= t.epochs and not self.finished:
                self.finished, self.stop_reason = True, f"reached train.epochs={t.epochs}"
            seconds = time.perf_counter() - start
            self.train_seconds += seconds
            row["seconds"] = round(seconds, 3)
            self.history.append(row)
            tb.scalars(
                {
                    "train/loss": train_loss,
                    "train/lr": lr,
                    "val/dice": row["val_dice"],
                    "val/iou": row["val_iou"],
                    "val/hd95": row["val_hd95"],
                },
                self.epoch,
            )
            if improved and self.dist.is_main:
                ckpt.save_checkpoint(
                    self.dir / ckpt.BEST,
                    {
                        **self.setup,
                        "model_name": self.cfg.model.name,
                        "fold": self.fold,
                        "epoch": self.epoch,
                        "best_dice": self.best_dice,
                        # the threshold the validation Dice (selection, early stopping) was computed at
                        "selection_threshold": float(self.cfg.eval.threshold),
                        "model": ckpt.unwrap(self.model).state_dict(),
                    },
                )
            state = self.state()  # on every rank: it gathers each rank's CUDA generator state
            if self.dist.is_main:
                ckpt.save_checkpoint(self.dir / ckpt.LAST, state)
                write_train_log(self.dir / "train_log.csv", self.history)
            self.saved_epoch = self.epoch
            record.data["train_seconds"] = round(self.train_seconds, 3)
            val = (
                ""
                if row["val_dice"] is None
                else f"  val dice {row['val_dice']:.4f} (best {self.best_dice:.4f} @ {self.best_epoch})"
            )
            LOG.info(
                "fold %d epoch %d/%d  loss %.4f%s  lr %.2e  %.1f s",
                self.fold,
                self.epoch,
                t.epochs,
                train_loss,
                val,
                lr,
                seconds,
            )


def _precision(dtype: torch.dtype | None) -> str:
    """``float32``, ``bfloat16`` or ``float16``: what a run computes in."""
    return str(dtype or torch.float32).removeprefix("torch.")


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False, lineterminator="\n"))


def _clear_fold(fold_dir: Path) -> None:
    """Delete a fold's results (not the lock file held by this process)."""
    for child in sorted(fold_dir.iterdir()):
        if child.name == LOCK_NAME:
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def train_fold(
    cfg: Config,
    fold: int,
    run_dir: Path,
    device: torch.device,
    manifest_hashes: dict[str, str],
    resume: bool = True,
) -> Path:
    """Train (or resume, or skip when done) fold ``fold``; returns its folder."""
    fold_dir = run_dir / f"fold{fold}"
    with distributed.main_lock(fold_dir):
        return _train_fold_locked(cfg, fold, fold_dir, device, manifest_hashes, resume)


def training_forward(model: nn.Module, device: torch.device, compile: bool, accumulate: int = 1) -> nn.Module:
    """The module the training loop calls: ``model`` in DistributedDataParallel under torchrun, then compiled.

    Compiling the DDP-wrapped model (not wrapping the compiled one) lets torch's compiler split the graph at DDP's
    gradient buckets, so the all-reduce of one bucket overlaps the backward of the next. Validation calls the model
    without DDP's collectives (:func:`busbench.engine.distributed.unwrap`): the compiled model in one process, the
    plain one under torchrun (whose ranks validate different numbers of batches).
    The trainer compiles on CUDA only (``train.compile`` is ignored on the CPU, where compiling a network takes
    longer than a short run saves).
    """
    forward = distributed.wrap(model, device, accumulate)
    return torch.compile(forward) if compile else forward


def _train_fold_locked(
    cfg: Config,
    fold: int,
    fold_dir: Path,
    device: torch.device,
    manifest_hashes: dict[str, str],
    resume: bool,
) -> Path:
    done = fold_dir / DONE_FILE
    if resume and done.is_file():
        LOG.info("fold %d is done (%s); skipping it. Use --no-resume to train it again", fold, done)
        return fold_dir
    if distributed.context().is_main:
        if not resume:
            _clear_fold(fold_dir)
        for stale in remove_stale_temporaries(fold_dir):
            LOG.info("removed %s, half-written by a run that was killed", stale)
    distributed.barrier()  # the other ranks look at the fold folder only after rank 0 has tidied it

    trainer = FoldTrainer(cfg, fold, fold_dir, device, manifest_hashes)
    resumed_from = 0
    if resume and (fold_dir / ckpt.LAST).is_file():
        trainer.restore(fold_dir / ckpt.LAST)
        resumed_from = trainer.epoch
        LOG.info("fold %d: resuming after epoch %d from %s", fold, trainer.epoch, fold_dir / ckpt.LAST)
    if cfg.train.compile and device.type != "cuda":
        LOG.info("train.compile is ignored on the CPU")
    compile_model = cfg.train.compile and device.type == "cuda"
    trainer.forward = training_forward(trainer.model, device, compile_model, cfg.train.accumulate)

    splits = data_split_provenance(cfg.data.datasets, cfg.data.data_root)
    static = {
        "experiment": cfg.experiment.name,
        "dataset": "+".join(cfg.data.datasets),
        "model": cfg.model.name,
        "fold": fold,
        "config_hash": cfg.hash(),
        "training_hash": trainer.config_hash,
        "manifest_sha256": manifest_hashes,
        "seeds": {"train": cfg.train.seed, "data_split": split_seed(splits)},
        "data_split": splits,
        "deterministic": cfg.train.deterministic,
        "precision": _precision(trainer.dtype),
        "n_train": len(trainer.train_ds),
        "n_val": len(trainer.val_ds),
        "params_m": round(trainer.params_m, 4),
        **trainer.init_info,
        **environment(device),
    }
    record = RunRecord(fold_dir / "run.json", static, enabled=trainer.dist.is_main)
    record.start(resumed_from_epoch=resumed_from, processes=trainer.dist.world_size)
    tb = trackers.Mirrored(
        TensorBoardLog(
            fold_dir / "tensorboard",
            cfg.output.tensorboard and trainer.dist.is_main,
            purge_step=resumed_from + 1 if resumed_from else None,
        ),
        trackers.start(cfg, fold_dir, f"{static['dataset']}/{cfg.model.name}/fold{fold}")
        if trainer.dist.is_main
        else trackers.Tracker(),
    )
    try:
        trainer.run(record, tb)
    except KeyboardInterrupt:
        kept = (
            f"{fold_dir / ckpt.LAST} holds epoch {trainer.saved_epoch}"
            if trainer.saved_epoch
            else "no epoch had finished"
        )
        record.finish("interrupted", train_seconds=round(trainer.train_seconds, 3))
        LOG.warning(
            "fold %d interrupted; %s. Run the same command again to resume",
            fold,
            kept,
        )
        raise
    except TrainingDiverged:
        record.finish("diverged", train_seconds=round(trainer.train_seconds, 3))
        raise
    except RuntimeError as exc:
        record.finish("failed", error=str(exc).splitlines()[0][:300])
        if cfg.train.deterministic and "deterministic implementation" in str(exc):
            raise ConfigError(
                f"train.deterministic=true, but an operation of model {cfg.model.name!r} has no deterministic "
                f"implementation on {device.type} ({str(exc).splitlines()[0][:200]}); set train.deterministic=false"
            ) from None
        raise
    except BaseException as exc:
        record.finish(
            "failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        )
        raise
    finally:
        tb.close()

    summary = {
        "fold": fold,
        "best_epoch": trainer.best_epoch,
        "best_val_dice": trainer.best_dice,
        "epochs_run": trainer.epoch,
        "stop_reason": trainer.stop_reason,
        "train_seconds": round(trainer.train_seconds, 3),
        "finished": now(),
        "busbench_version": busbench.__version__,
        "config_hash": trainer.config_hash,
    }
    record.finish(
        "completed",
        best_epoch=trainer.best_epoch,
        best_val_dice=trainer.best_dice,
        train_seconds=round(trainer.train_seconds, 3),
        stop_reason=trainer.stop_reason,
    )
    if trainer.dist.is_main:
        atomic_write_text(done, json.dumps(summary, indent=2) + "\n")
    LOG.info(
        "fold %d finished: best validation Dice %.4f at epoch %d (%s)",
        fold,
        trainer.best_dice,
        trainer.best_epoch,
        trainer.stop_reason,
    )
    distributed.barrier()  # no rank moves on before rank 0 has written done.json
    return fold_dir


def build_cache_once(cfg: Config) -> None:
    """Under torchrun, rank 0 builds the data cache (``data.cache``) while the others wait, so that N processes do
    not decode and write the same images N times; the others then find it built. Rank 0's error, if any, stops
    every rank (none is left waiting at a barrier). A no-op in one process, where the loader builds it."""
    ctx = distributed.context()
    if not (cfg.data.cache and ctx.active):
        return
    error: Exception | None = None
    if ctx.is_main:
        try:
            _data_api().build_datasets(cfg, 0)  # builds (or finds) the cache of every dataset of the run
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks are told
            error = exc
    message = distributed.broadcast_object(None if error is None else str(error))  # also the barrier
    if error is not None:
        raise error
    if message is not None:
        raise BusbenchError(f"rank 0 could not build the data cache: {message}")


def train(
    cfg: Config, folds: list[int] | None = None, resume: bool = True, force: bool = False
) -> list[Path]:
    """Train the given folds (all ``data.folds`` when None) of the experiment ``cfg``; returns the fold folders.

    Before any training the manifests are checked for patients or duplicate groups crossing the test split and the
    folds, and the run directory's ``config.yaml`` is written (see the module docstring).
    """
    ensure_console_logging()
    k = cfg.data.folds
    folds = list(range(k)) if folds is None else sorted(set(folds))
    bad = [f for f in folds if not 0 <= f < k]
    if bad:
        raise ConfigError(f"fold(s) {bad} do not exist: data.folds={k}, so --fold must be in 0..{k - 1}")
    # Built once before anything is written, so an unknown model, a wrong parameter or an image size the model
    # cannot take fails without leaving a run folder behind; each fold builds its own, freshly seeded, copy.
    tasks.build_task(cfg).check_model(build_model(cfg))
    trackers.check_available(cfg)
    device = resolve_device(cfg.train.device)
    distributed.check_config(cfg)
    dist_ctx = distributed.setup(device)  # torchrun: join the process group (no-op in one process)
    finetune.check_source(cfg, folds)
    manifest_hashes = check_data(cfg)
    build_cache_once(cfg)
    run_dir = cfg.run_dir()
    if dist_ctx.is_main:
        with locked(run_dir, wait=30.0):
            prepare_run_dir(cfg, run_dir, force=force)
    distributed.barrier()
    LOG.info(
        "training %s on %s, folds %s, device %s -> %s",
        cfg.model.name,
        "+".join(cfg.data.datasets),
        folds,
        device,
        run_dir,
    )
    return [train_fold(cfg, f, run_dir, device, manifest_hashes, resume=resume) for f in folds]


# --------------------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="experiment YAML (composed over configs/default.yaml)"
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set train.lr=3e-4 data.image_size=256",
    )
    parser.add_argument(
        "--fold",
        type=int,
        action="append",
        default=None,
        help="train only this fold (repeatable); default: every fold",
    )
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from checkpoint_last.pt and skip finished folds (default); --no-resume starts over",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="delete earlier results of a different training setup in the run directory",
    )


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # a batch scheduler's SIGTERM ends the run like Ctrl-C: last epoch kept, clean record


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        folders = train(cfg, folds=args.fold, resume=args.resume, force=args.force)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if distributed.context().is_main:
        print(f"trained {len(folders)} fold(s) in {cfg.run_dir()}")
    return 0
