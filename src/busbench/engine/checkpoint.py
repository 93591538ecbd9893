"""Checkpoint files: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a plain mapping of tensors and primitive containers (no pickled objects), so loading one can never
run code. Every checkpoint records the busbench version, the model name and :func:`training_hash` of the config
that produced it; loading weights into a model of another shape fails with a :class:`ModelError` naming the file.

Files per fold:

* ``checkpoint_last.pt`` - the full training state at the end of the latest finished epoch (model, optimiser,
  scheduler, gradient scaler, RNG states, epoch, best score, early-stopping counter, history); resuming from it
  continues the run exactly.
* ``checkpoint_best.pt`` - model weights of the epoch with the best validation Dice, plus that epoch and score.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import busbench
from busbench.atomic import atomic_path
from busbench.config import Config, deep_merge, validate
from busbench.errors import ConfigError, ModelError

CHECKPOINT_FORMAT = 1
LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"

# Keys that change how results are reported or where files go, not what a run learns: changing them neither
# invalidates a checkpoint nor calls for a new run directory.
_NON_TRAINING_KEYS = {
    "experiment": ("description",),
    # data.cache only changes where pixels are read from (the cache holds the same preprocessed arrays) and
    # train.device where the arithmetic runs: a run trained on a GPU can be tested on a laptop with the cache off
    "data": ("data_root", "num_workers", "cache"),
    "task": ("refine",),  # multitask post-processing at inference
    "train": ("device",),
    "eval": None,
    "output": None,
}


def training_dict(cfg: Config) -> dict[str, Any]:
    """The part of a config that determines the trained weights (see ``_NON_TRAINING_KEYS``)."""
    data = cfg.to_dict()
    for section, keys in _NON_TRAINING_KEYS.items():
        if keys is None:
            data.pop(section, None)
        else:
            for key in keys:
                data.get(section, {}).pop(key, None)
    return data


def training_hash(cfg: Config) -> str:
    """Stable hash of :func:`training_dict`: equal hashes mean interchangeable checkpoints."""
    payload = json.dumps(training_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting that differs between two (nested) config mappings."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def setup_fields(cfg: Config) -> dict[str, str]:
    """What a checkpoint records about the setup that trained it: the hash and the settings themselves (JSON)."""
    return {
        "config_hash": training_hash(cfg),
        "training_config": json.dumps(training_dict(cfg), sort_keys=True, separators=(",", ":")),
    }


def setup_differences(payload: dict[str, Any], cfg: Config) -> list[str]:
    """How the setup recorded in a checkpoint differs from ``cfg`` (empty: the checkpoint belongs to ``cfg``).

    The recorded settings are read through the current schema first, so a config key added to busbench later, at
    its default, does not set old checkpoints apart from their run.
    """
    stored = payload.get("training_config")
    if not isinstance(stored, str):  # written before checkpoints recorded their settings
        recorded = payload.get("config_hash")
        return [] if recorded == training_hash(cfg) else [f"config hash {recorded} -> {training_hash(cfg)}"]
    try:
        old = validate(deep_merge(Config().to_dict(), json.loads(stored)), source="the checkpoint's settings")
    except (ConfigError, ValueError) as exc:
        return [f"its settings are not valid for this busbench ({str(exc)[:200]})"]
    return config_differences(training_dict(old), training_dict(cfg))


def describe(diffs: list[str], limit: int = 5) -> str:
    return "; ".join(diffs[:limit]) + (f"; and {len(diffs) - limit} more" if len(diffs) > limit else "")


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameters a checkpoint stores, inside ``torch.compile`` and DistributedDataParallel wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` plus version fields to ``path`` in one atomic rename.

    The bytes go through a Python file object, so that a full disk raises ``OSError(ENOSPC)``, which ``atomic_path``
    reports as one clear error. Given a file name, torch's own writer turns it into an opaque ``RuntimeError`` and
    keeps the half-written file open (its space unreleased) while the error propagates.
    """
    full = {"format": CHECKPOINT_FORMAT, "busbench_version": busbench.__version__, **payload}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        try:
            torch.save(full, fh)
        except RuntimeError as exc:
            # torch's zip writer, closing after a failed write, replaces that write's OSError with its own error
            context = exc.__context__
            while context is not None and not isinstance(context, OSError):
                context = context.__context__
            if context is None:
                raise
            raise context from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint safely (tensors and primitive containers only) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist; train the fold first (busbench train)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ModelError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "it is damaged or not a busbench checkpoint - delete it and train the fold again"
        ) from None
    if not isinstance(payload, dict) or "model" not in payload or "format" not in payload:
        raise ModelError(f"{path} is not a busbench checkpoint (no model weights); delete it and train again")
    if payload["format"] > CHECKPOINT_FORMAT:
        raise ModelError(
            f"checkpoint {path} has format {payload['format']}, newer than this busbench "
            f"({busbench.__version__}) reads; upgrade busbench"
        )
    return payload


def load_model_state(model: nn.Module, payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Load a checkpoint's weights into ``model``; any missing, extra or reshaped tensor is a ModelError."""
    target = unwrap(model)
    state = payload["model"]
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or reshaped:
        parts = []
        for what, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("with another shape", reshaped),
        ):
            if keys:
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                parts.append(f"{len(keys)} tensor(s) {what} ({', '.join(keys[:3])}{more})")
        saved = payload.get("model_name", "?")
        raise ModelError(
            f"checkpoint {path} (model {saved!r}) does not fit the model {type(target).__name__}: "
            f"{'; '.join(parts)}. Check that model.name and model.params match the config the run was trained with"
        )
    target.load_state_dict(state, strict=True)
