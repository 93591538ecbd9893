"""Multi-process training (``torchrun ... -m busbench train``) against the single-process trainer.

The samplers are checked on their own: the ranks' shares of a global batch are exactly the single-process batch,
with the same augmentation seeds. Then one ``torchrun --nproc_per_node 2`` run on the CPU (gloo) trains fold 0
from scratch and *resumes* fold 1 from a checkpoint a single process left after epoch 1; both folds must match a
single-process run of the same config.

Tolerance. The comparison uses a model without BatchNorm (a small Swin-Unet: LayerNorm only, drop-path off) and
the BCE loss, a mean over images and pixels; then the two-process gradient (the mean of the two half-batch
gradients) is the single-process gradient up to floating-point summation order (~1e-7 relative). AdamW divides by
the root of the squared-gradient average, which magnifies such differences in coordinates whose gradients are
near zero, so after four steps the weights agree to ~1e-5 (measured max |diff| 1.4e-5); we allow 1e-4. Losses agree
to 1e-5 relative, and the thresholded validation masks (hence every per-image metric) come out identical here;
the per-image tables are compared at 1e-3. BatchNorm models are not equal on the CPU: torch has no CPU SyncBatchNorm,
so each process normalises its own half batch (see busbench.engine.distributed); Dice-type losses likewise differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from engine_testdata import DEMO, REPO, interrupt_in_epoch

from busbench.config import load_config
from busbench.data.loader import EpochSampler
from busbench.engine import checkpoint as ckpt
from busbench.engine import distributed
from busbench.engine.distributed import BlockSampler, ShardedEpochSampler, per_rank_batch
from busbench.engine.train import train
from busbench.errors import ConfigError

# ------------------------------------------------------------------------------------------------ samplers


@pytest.mark.parametrize(
    ("n", "b", "world", "drop_last"), [(23, 3, 2, True), (23, 3, 2, False), (10, 2, 4, True)]
)
def test_ranks_share_exactly_the_single_process_global_batches(n, b, world, drop_last):
    single = EpochSampler(n, shuffle=True, seed=7)
    ranks = [ShardedEpochSampler(n, True, 7, b, r, world, drop_last) for r in range(world)]
    for epoch in (0, 3):
        single.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        full = list(single)
        shares = [list(s) for s in ranks]
        assert len({len(s) for s in shares}) == 1, "every rank must take the same number of steps"
        assert all(len(s) == len(r) for s, r in zip(shares, ranks, strict=True))
        g = b * world
        n_global = len(shares[0]) // b
        for j in range(n_global):
            together = [pair for share in shares for pair in share[j * b : (j + 1) * b]]
            expected = [full[i % n] for i in range(j * g, (j + 1) * g)]
            assert together == expected  # same images, same order, same augmentation seeds
        if drop_last:
            assert n_global == n // g
        else:
            assert n_global == -(-n // g)


def test_sharding_follows_oversampled_epochs():
    items = [0, 0, 1, 2, 2, 2, 3, 4]
    single = list(EpochSampler(5, True, 3, indices=items))
    shares = [list(ShardedEpochSampler(5, True, 3, 2, r, 2, True, indices=items)) for r in range(2)]
    assert shares[0] + shares[1] != single  # interleaved by global batch, not halves
    rebuilt = [p for j in range(2) for share in shares for p in share[2 * j : 2 * j + 2]]
    assert rebuilt == single


def test_validation_blocks_cover_the_fold_in_order():
    for n, world in ((9, 2), (3, 4), (0, 2)):
        blocks = [list(BlockSampler(n, 0, r, world)) for r in range(world)]
        assert [i for block in blocks for i, _ in block] == list(range(n))


def test_global_batch_must_split_evenly():
    assert per_rank_batch(8, 2) == 4
    with pytest.raises(ConfigError, match="train.batch_size.*multiple of 4"):
        per_rank_batch(6, 4)


def test_single_process_is_untouched(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.setup(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.active) == (0, 1, True, False)
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, torch.device("cpu")) is model
    value = torch.tensor(3.0)
    assert distributed.mean_across_ranks(value) is value


# ------------------------------------------------------------------------------------------------ torchrun

OVERRIDES = [
    "data.image_size=64",
    "data.folds=2",
    "data.augment=light",
    "model.name=swinunet",
    "model.params.embed_dim=12",
    "model.params.encoder_depths=[1,1,1,1]",
    "model.params.decoder_depths=[1,1,1]",
    "model.params.num_heads=[1,1,2,2]",
    "model.params.drop_path_rate=0.0",
    "train.loss=bce",
    "train.epochs=2",
    "train.batch_size=4",
    "train.lr=3e-3",
    "eval.batch_size=8",
    "output.tensorboard=false",
]


def _overrides(data_root: Path, out: Path) -> list[str]:
    return [f"data.data_root={data_root}", f"output.root={out}", *OVERRIDES]


def _fold(out: Path, k: int) -> Path:
    return out / "demo" / "busi" / "swinunet" / f"fold{k}"


def _assert_same_fold(single: Path, multi: Path) -> None:
    log_a = pd.read_csv(single / "train_log.csv").drop(columns=["seconds"])
    log_b = pd.read_csv(multi / "train_log.csv").drop(columns=["seconds"])
    pd.testing.assert_frame_equal(log_a, log_b, check_exact=False, rtol=1e-5)
    val_a, val_b = pd.read_csv(single / "val_per_image.csv"), pd.read_csv(multi / "val_per_image.csv")
    assert val_a["sample_id"].tolist() == val_b["sample_id"].tolist()  # complete, in the single-process order
    pd.testing.assert_frame_equal(val_a, val_b, check_exact=False, rtol=1e-3, atol=1e-3)
    for name in (ckpt.LAST, ckpt.BEST):
        a, b = ckpt.load_checkpoint(single / name), ckpt.load_checkpoint(multi / name)
        assert a["epoch"] == b["epoch"] and a["config_hash"] == b["config_hash"]
        for key, value in a["model"].items():
            np.testing.assert_allclose(
                value.float().numpy(), b["model"][key].float().numpy(), atol=1e-4, err_msg=key
            )
    assert (
        json.loads((multi / "done.json").read_text())["best_epoch"]
        == json.loads((single / "done.json").read_text())["best_epoch"]
    )


@pytest.fixture
def one_thread():
    """One intra-op thread, as torchrun gives each process: tiny models run fastest so on a shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_torchrun_two_processes_match_one_and_resume_its_checkpoint(
    synthetic_root, tmp_path, monkeypatch, one_thread
):
    single, multi = tmp_path / "single", tmp_path / "multi"
    train(load_config(DEMO, _overrides(synthetic_root, single)))  # both folds, one process

    with monkeypatch.context() as m:  # fold 1 in one process, stopped during epoch 2
        interrupt_in_epoch(m, 2)
        with pytest.raises(KeyboardInterrupt):
            train(load_config(DEMO, _overrides(synthetic_root, multi)), folds=[1])
    assert ckpt.load_checkpoint(_fold(multi, 1) / ckpt.LAST)["epoch"] == 1

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "busbench", "train", "--config", str(DEMO), "--set", *_overrides(synthetic_root, multi)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("trained 2 fold(s)") == 1, "only rank 0 reports"

    for k in (0, 1):
        _assert_same_fold(_fold(single, k), _fold(multi, k))
    sessions = [json.loads((_fold(multi, k) / "run.json").read_text())["sessions"] for k in (0, 1)]
    assert [(s["status"], s["processes"]) for s in sessions[0]] == [("completed", 2)]
    assert [(s["status"], s["processes"], s["resumed_from_epoch"]) for s in sessions[1]] == [
        ("interrupted", 1, 0),
        ("completed", 2, 1),
    ]
    leftovers = sorted(p.name for p in _fold(multi, 0).iterdir())
    assert leftovers == sorted(
        p.name for p in _fold(single, 0).iterdir()
    )  # nothing written twice or per rank
