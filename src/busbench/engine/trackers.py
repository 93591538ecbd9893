"""Experiment trackers: mirror training and test results to MLflow or Weights & Biases (``output.tracker``).

``tensorboard`` (the default) writes TensorBoard event files only (``<fold>/tensorboard/``, ``output.tensorboard``).
``mlflow`` and ``wandb`` write those too and mirror, per fold, into one tracker run named
``<dataset>/<model>/fold<k>``:

- the resolved configuration (MLflow: flattened into parameters plus a ``config.yaml`` artifact; wandb: the run
  config), logged when the run starts;
- the per-epoch scalars of ``train_log.csv`` (``train/loss``, ``train/lr``, ``val/dice``, ``val/iou``,
  ``val/hd95``), with the epoch as step;
- the validation overlays (``output.overlays`` images per validation; MLflow: ``overlays/epoch<E>_<i>.png``
  artifacts; wandb: ``val/overlay`` images);

and ``busbench test`` mirrors its ``summary.csv`` into a run named ``<dataset>/<model>/<test folder>`` (MLflow:
the file as an artifact; wandb: an artifact holding the file, and the table). A resumed fold continues its tracker
run: the run id is kept in ``<fold>/tracker.json``.

Where runs go is each tracker's own setting, read from the environment: MLflow's ``MLFLOW_TRACKING_URI`` (the
MLflow experiment is ``experiment.name``), wandb's ``WANDB_PROJECT`` (default ``busbench``; the wandb group is
``<experiment>/<dataset>/<model>``), ``WANDB_MODE=offline`` and the login. The packages are optional extras:
``pip install "busbench[mlflow]"`` or ``"busbench[wandb]"``.

Only the main process of a distributed run logs. A tracker failing during training (a server going away) is logged
once as a warning and the tracker is switched off; training goes on, since the local files hold everything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from busbench.atomic import atomic_write_text
from busbench.config import Config
from busbench.errors import ConfigError

LOG = logging.getLogger(__name__)
STATE_FILE = "tracker.json"
EXTRAS = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}  # tracker -> (module, extra)


class Tracker:
    """No tracker (``output.tracker: tensorboard``); the interface the others implement."""

    name = "tensorboard"

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        pass

    def overlays(self, images: list[np.ndarray], step: int) -> None:
        pass

    def table(self, path: Path) -> None:
        """Mirror a CSV file (``summary.csv``)."""

    def close(self) -> None:
        pass


class _Guarded(Tracker):
    """Calls into the tracker library; the first failure is logged and switches the tracker off."""

    def __init__(self) -> None:
        self.failed = False

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self.failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # tracker clients raise many types (HTTP, file system, their own)
            self.failed = True
            LOG.warning(
                "output.tracker=%s stopped logging (%s failed: %s: %s); the local files are complete",
                self.name,
                what,
                type(exc).__name__,
                str(exc).splitlines()[0][:200] if str(exc) else "",
            )


def _status() -> str:
    """``completed``, ``interrupted`` or ``failed``, from the exception being handled (if any) where it is asked."""
    exc = sys.exc_info()[1]
    if exc is None:
        return "completed"
    return "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"


def _finite(values: dict[str, float | None]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if v is not None and np.isfinite(v)}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return flat


def _import(tracker: str) -> Any:
    module, extra = EXTRAS[tracker]
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(
            f'output.tracker={tracker} needs the {module} package: pip install "busbench[{extra}]" '
            "(or set output.tracker=tensorboard)"
        ) from None


class MlflowTracker(_Guarded):
    name = "mlflow"

    def __init__(self, cfg: Config, run_name: str, run_id: str | None) -> None:
        super().__init__()
        _import("mlflow")
        from mlflow import MlflowClient

        try:
            self.client = MlflowClient()
            experiment = self.client.get_experiment_by_name(cfg.experiment.name)
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(cfg.experiment.name)
            )
            if run_id is None:
                run = self.client.create_run(experiment_id, run_name=run_name, tags={"busbench.run": run_name})
                self.run_id = run.info.run_id
                self._log_params(cfg)
            else:
                self.run_id = self.client.get_run(run_id).info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            self.client.log_dict(self.run_id, cfg.to_dict(), "config.yaml")
        except Exception as exc:
            raise ConfigError(
                f"output.tracker=mlflow: cannot open an MLflow run at {_mlflow_uri()} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300]}); check MLFLOW_TRACKING_URI or set output.tracker=tensorboard"
            ) from None

    def _log_params(self, cfg: Config) -> None:
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in sorted(_flatten(cfg.to_dict()).items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in _finite(values).items()]
        if metrics:
            self._call("log_batch", self.client.log_batch, self.run_id, metrics=metrics)

    def overlays(self, images: list[np.ndarray], step: int) -> None:
        for i, image in enumerate(images):
            name = f"overlays/epoch{step:04d}_{i}.png"
            self._call("log_image", self.client.log_image, self.run_id, image.transpose(1, 2, 0), artifact_file=name)

    def table(self, path: Path) -> None:
        self._call("log_artifact", self.client.log_artifact, self.run_id, str(path))

    def close(self) -> None:
        status = {"completed": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}[_status()]
        self._call("set_terminated", self.client.set_terminated, self.run_id, status)


def _mlflow_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


class WandbTracker(_Guarded):
    name = "wandb"

    def __init__(
        self, cfg: Config, run_name: str, run_id: str | None, folder: Path, group: str, job_type: str
    ) -> None:
        super().__init__()
        self.wandb = _import("wandb")
        try:
            self.run = self.wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "busbench",
                group=group,
                job_type=job_type,
                name=run_name,
                id=run_id,
                resume="allow",
                config=cfg.to_dict(),
                dir=str(folder),
            )
        except Exception as exc:
            raise ConfigError(
                f"output.tracker=wandb: cannot start a wandb run ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300]}); log in (wandb login), set WANDB_MODE=offline, or set "
                "output.tracker=tensorboard"
            ) from None
        self.run_id = self.run.id

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        finite = _finite(values)
        if finite:
            self._call("log", self.run.log, finite, step=step)

    def overlays(self, images: list[np.ndarray], step: int) -> None:
        if images:
            shown = [self.wandb.Image(image.transpose(1, 2, 0)) for image in images]
            self._call("log", self.run.log, {"val/overlay": shown}, step=step)

    def table(self, path: Path) -> None:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.run.name}-{path.stem}")
        artifact = self.wandb.Artifact(name, type="results")
        artifact.add_file(str(path))
        self._call("log_artifact", self.run.log_artifact, artifact)
        table = self.wandb.Table(dataframe=pd.read_csv(path, dtype={"fold": str}))
        self._call("log", self.run.log, {path.stem: table})

    def close(self) -> None:
        self._call("finish", self.run.finish, exit_code=0 if _status() == "completed" else 1)


def start(cfg: Config, folder: Path, run_name: str, job_type: str = "train", resume: bool = True) -> Tracker:
    """The tracker of ``output.tracker`` with a run named ``run_name`` started (or resumed from ``folder``).

    ``folder`` holds ``tracker.json`` (the run id, for resuming) and wandb's local files.
    """
    kind = cfg.output.tracker
    if kind == "tensorboard":
        return Tracker()
    _import(kind)  # a missing extra fails here, before anything is written
    state_path = Path(folder) / STATE_FILE
    run_id = None
    if resume and state_path.is_file():
        saved = json.loads(state_path.read_text())
        run_id = saved.get("run_id") if saved.get("tracker") == kind else None
    group = f"{cfg.experiment.name}/{'+'.join(cfg.data.datasets)}/{cfg.model.name}"
    if kind == "mlflow":
        tracker: MlflowTracker | WandbTracker = MlflowTracker(cfg, run_name, run_id)
    else:
        tracker = WandbTracker(cfg, run_name, run_id, Path(folder), group, job_type)
    if resume:
        atomic_write_text(state_path, json.dumps({"tracker": kind, "run_id": tracker.run_id}) + "\n")
    return tracker


def check_available(cfg: Config) -> None:
    """ConfigError naming the extra to install when ``output.tracker``'s package is missing."""
    if cfg.output.tracker != "tensorboard":
        _import(cfg.output.tracker)


class Mirrored:
    """A fold's TensorBoard log and tracker behind the one ``scalars`` / ``overlays`` / ``close`` interface."""

    def __init__(self, *logs: Any) -> None:
        self.logs = logs

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        for log in self.logs:
            log.scalars(values, step)

    def overlays(self, images: list[np.ndarray], step: int) -> None:
        for log in self.logs:
            log.overlays(images, step)

    def close(self) -> None:
        for log in self.logs:
            log.close()


def log_summary(cfg: Config, summary_path: Path, run_dir: Path) -> None:
    """Mirror a ``busbench test`` ``summary.csv`` into a tracker run ``<dataset>/<model>/<test folder>``."""
    if cfg.output.tracker == "tensorboard":
        return
    folder = summary_path.parent
    where = "test" if folder == run_dir else folder.name
    name = f"{'+'.join(cfg.data.datasets)}/{cfg.model.name}/{where}"
    tracker = start(cfg, folder, name, job_type="test", resume=False)
    try:
        tracker.table(summary_path)
    finally:
        tracker.close()
