"""Seeding and random-number-generator state, so that a run is repeatable and a resumed run continues exactly.

Three generators drive a training run: Python's ``random`` (albumentations), NumPy's global generator (augmentation
helpers) and torch's (weight initialisation, dropout, the DataLoader's shuffling and worker seeds). :func:`seed_everything`
seeds them all from one integer; :func:`rng_state` / :func:`set_rng_state` capture and restore them as plain tensors
and lists, so that checkpoints can be read back with ``torch.load(weights_only=True)``.

NumPy's legacy global generator is seeded and saved on purpose: third-party code (augmentation helpers, some
models) draws from it, and a resumed run must see the same stream. Sample order and augmentation themselves are
functions of (seed, epoch) in the loader (:mod:`busbench.data.loader`), the same with any number of workers.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

# cuBLAS needs a fixed workspace to make its reductions deterministic (CUDA >= 10.2).
_CUBLAS_WORKSPACE = ":4096:8"


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device).

    With ``deterministic`` torch refuses ops without a deterministic implementation (an error, not a warning, so
    that a run claimed deterministic is) and cuDNN autotuning is off. Without it cuDNN may pick the fastest kernels.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the global stream others draw from
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = torch.cuda.is_available()


def device_rng_state() -> torch.Tensor | None:
    """The generator state of this process's CUDA device (None without CUDA)."""
    return torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def rng_state(
    generator: torch.Generator | None = None, device_states: list[torch.Tensor | None] | None = None
) -> dict[str, Any]:
    """Every generator's state as tensors and lists of ints (loadable with ``weights_only=True``).

    ``device_states`` lists the CUDA generator state of each rank's own device, in rank order (under torchrun each
    process draws dropout and drop-path masks on its own GPU, which no other process advances); by default this
    process's device alone. CPU-side generators are the same on every rank, so one copy is kept.
    """
    if device_states is None:
        device_states = [device_rng_state()]
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)  # noqa: NPY002
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda_per_rank": [] if all(d is None for d in device_states) else list(device_states),
        "loader": generator.get_state() if generator is not None else None,
    }
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None, rank: int = 0) -> None:
    """Restore the states captured by :func:`rng_state`; ``rank`` picks this process's CUDA device state.

    A rank the checkpoint holds no device state for (resumed with more processes than wrote it) keeps its seeded
    device generator.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    per_rank = state.get("cuda_per_rank")
    if per_rank is not None:
        if torch.cuda.is_available() and rank < len(per_rank) and per_rank[rank] is not None:
            torch.cuda.set_rng_state(per_rank[rank])  # the current device: this rank's GPU
    elif state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])  # checkpoints written before per-rank states
    if generator is not None and state.get("loader") is not None:
        generator.set_state(state["loader"])
