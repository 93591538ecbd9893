"""The trainer's CUDA-only branches, run on the CPU wherever PyTorch allows.

On a CPU the trainer computes in float32 and ignores ``train.amp`` and ``train.compile``. These tests make the same
code take the GPU branches: ``amp_dtype`` is patched to hand the trainer bfloat16 or float16, which CPU autocast
and ``torch.amp.GradScaler("cpu")`` support; ``channels_last`` works on the CPU as it is; ``torch.compile`` runs
with the CPU backend where a C++ compiler exists. Multi-GPU behaviour (per-rank CUDA generators, ``no_sync`` under
gradient accumulation) runs in two gloo processes, with a fake per-process "GPU generator" standing in for CUDA's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
import two_ranks
from engine_testdata import REPO, interrupt_in_epoch, tiny_config
from torch import nn

from busbench.engine import checkpoint as ckpt
from busbench.engine import distributed, inference
from busbench.engine import tasks as tasks_mod
from busbench.engine import train as train_mod
from busbench.engine.train import train, training_forward
from busbench.methods.multitask import MultiTaskModel
from busbench.models import create_model
from busbench.models.maskrcnn import maskrcnn_targets_from_masks


def fold_dir(out: Path) -> Path:
    return out / "demo" / "busi" / "unet" / "fold0"


def force_precision(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype | None) -> None:
    """Make the trainer autocast to ``dtype`` on the CPU, as it would on a GPU."""
    monkeypatch.setattr(train_mod, "amp_dtype", lambda device, amp: dtype)


# ------------------------------------------------------------------------------------------------ precision


def test_bf16_only_where_the_gpu_computes_it_natively(monkeypatch):
    """V100/T4 report bf16 support only when emulation counts: they must get float16 with a scaler."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert inference.amp_dtype(cuda, "bf16") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert inference.amp_dtype(cuda, "bf16") == torch.bfloat16
    assert inference.amp_dtype(cuda, "fp16") == torch.float16
    assert inference.amp_dtype(cuda, "none") is None
    assert inference.amp_dtype(torch.device("cpu"), "bf16") is None


# Tolerances of the mixed-precision runs (with channels_last) against float32: same seed, same batches, 2 epochs of
# a 32 px U-Net of width 4. Measured largest relative differences of the epoch losses: bfloat16 3.5e-3, float16
# 2.6e-3; allowed: 2e-2 and 1e-2.
PRECISIONS = {"bfloat16": (torch.bfloat16, 2e-2), "float16": (torch.float16, 1e-2)}


@pytest.mark.parametrize("name", sorted(PRECISIONS))
def test_mixed_precision_and_channels_last_train_like_float32(synthetic_root, tmp_path, monkeypatch, name):
    dtype, rtol = PRECISIONS[name]
    (reference,) = train(tiny_config(synthetic_root, tmp_path / "fp32", "train.grad_clip=1.0"), folds=[0])
    force_precision(monkeypatch, dtype)
    (mixed,) = train(
        tiny_config(synthetic_root, tmp_path / name, "train.channels_last=true", "train.grad_clip=1.0"), folds=[0]
    )
    assert json.loads((mixed / "run.json").read_text())["precision"] == name
    last = ckpt.load_checkpoint(mixed / ckpt.LAST)
    assert last["precision"] == name
    assert all(t.dtype == torch.float32 for t in last["model"].values() if t.is_floating_point())
    if dtype == torch.float16:  # the CPU gradient scaler ran: its scale is in the checkpoint
        assert last["scaler"]["scale"] > 0
    else:
        assert last["scaler"] == {}
    ref_log = pd.read_csv(reference / "train_log.csv")
    log = pd.read_csv(mixed / "train_log.csv")
    np.testing.assert_allclose(log["train_loss"], ref_log["train_loss"], rtol=rtol)


def test_resume_across_precisions_and_float16_resume_is_exact(synthetic_root, tmp_path, monkeypatch, caplog):
    """A float32 checkpoint (no scaler state) resumed where the trainer uses float16 (the scaler needs a state):
    it resumes with a fresh scaler and one warning line. A float16 run resumed in float16 ends with the weights
    and scaler state of the uninterrupted run."""
    with monkeypatch.context() as m:
        interrupt_in_epoch(m, 2)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(synthetic_root, tmp_path / "mixed"), folds=[0])
    assert ckpt.load_checkpoint(fold_dir(tmp_path / "mixed") / ckpt.LAST)["scaler"] == {}
    force_precision(monkeypatch, torch.float16)
    with caplog.at_level(logging.WARNING, logger="busbench"):
        train(tiny_config(synthetic_root, tmp_path / "mixed"), folds=[0])
    assert "was trained in float32, this device trains in float16" in caplog.text
    assert ckpt.load_checkpoint(fold_dir(tmp_path / "mixed") / ckpt.LAST)["scaler"]["scale"] > 0

    train(tiny_config(synthetic_root, tmp_path / "straight"), folds=[0])
    with monkeypatch.context() as m:
        interrupt_in_epoch(m, 2)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(synthetic_root, tmp_path / "resumed"), folds=[0])
    train(tiny_config(synthetic_root, tmp_path / "resumed"), folds=[0])
    a = ckpt.load_checkpoint(fold_dir(tmp_path / "straight") / ckpt.LAST)
    b = ckpt.load_checkpoint(fold_dir(tmp_path / "resumed") / ckpt.LAST)
    assert a["scaler"] == b["scaler"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


# ------------------------------------------------------------------------------------------------ accumulation


def test_accumulation_syncs_once_per_step_and_weights_a_short_last_step_fully(
    synthetic_root, tmp_path, monkeypatch
):
    """With train.accumulate=3 the gradient is all-reduced only on each step's last micro-batch, and an epoch
    whose last step has fewer micro-batches divides their losses by that number, not by train.accumulate."""
    syncs, losses, scaled = [], [], []
    real_sync = distributed.gradient_sync

    def record_sync(module, sync):
        syncs.append(sync)
        return real_sync(module, sync)

    real_build = train_mod.build_loss

    def build(cfg):
        loss = real_build(cfg)

        def forward(outputs, target):
            value = loss(outputs, target)
            losses.append(value.item())
            return value

        return forward

    real_scale = torch.amp.GradScaler.scale

    def record_scale(self, outputs):
        scaled.append(outputs.item())
        return real_scale(self, outputs)

    monkeypatch.setattr(distributed, "gradient_sync", record_sync)
    monkeypatch.setattr(train_mod, "build_loss", build)
    monkeypatch.setattr(torch.amp.GradScaler, "scale", record_scale)
    cfg = tiny_config(synthetic_root, tmp_path, "train.epochs=1", "train.batch_size=2", "train.accumulate=3")
    train(cfg, folds=[0])
    n = len(syncs)
    assert n % 3, "the epoch must end with a partial accumulation step for this test"
    assert syncs == [(i + 1) % 3 == 0 or i + 1 == n for i in range(n)]
    groups = [3] * (n - n % 3) + [n % 3] * (n % 3)
    np.testing.assert_allclose(np.array(losses) / np.array(scaled), groups, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ compile


def _has_cpp_compiler() -> bool:
    return any(shutil.which(c) for c in ([os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++"]))


@pytest.mark.slow
@pytest.mark.skipif(not _has_cpp_compiler(), reason="torch.compile for the CPU needs a C++ compiler on PATH")
def test_compiled_training_step_matches_eager_on_the_cpu(monkeypatch):
    """The trainer's training forward, compiled by torch's CPU backend (inductor, C++ kernels), takes the same step
    as the eager model under bf16 autocast and channels_last, as on a GPU. The network is the smallest that has
    the layers the models share (convolution, BatchNorm, ReLU): compiling takes ~45 s on a busy 2-core machine."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", 1)  # no pool of compile workers for four kernels

    def tiny() -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))
        return net.to(memory_format=torch.channels_last)

    eager, compiled_model = tiny(), tiny()
    forward = training_forward(compiled_model, torch.device("cpu"), compile=True)
    assert hasattr(forward, "_orig_mod") and distributed.unwrap(forward) is forward  # compiled; no DDP here
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=torch.channels_last)
    y = (x > 0.5).float()
    results = []
    for model in (eager, forward):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = nn.functional.binary_cross_entropy_with_logits(out.float(), y)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-2, atol=0)  # bf16 rounding may differ between kernels
    assert torch.nn.functional.cosine_similarity(grads_a, grads_b, dim=0) > 0.99


def test_mask_rcnn_decodes_boxes_in_float32_under_bf16_autocast():
    """Under bf16 autocast only Mask R-CNN's backbone computes in bfloat16; proposals and detections are decoded
    from float32 regression outputs (in bfloat16 a 224 px image's boxes snap to a 1-2 px grid)."""
    torch.manual_seed(0)
    model = create_model("maskrcnn", in_channels=1, num_classes=1, image_size=64)
    decoded: list[torch.dtype] = []
    for coder in (model.net.rpn.box_coder, model.net.roi_heads.box_coder):
        real = coder.decode

        def decode(rel_codes, boxes, real=real):
            decoded.append(rel_codes.dtype)
            return real(rel_codes, boxes)

        coder.decode = decode
    backbone: list[torch.dtype] = []
    model.net.backbone.register_forward_hook(lambda module, inputs, out: backbone.append(out["0"].dtype))
    x = torch.rand(2, 1, 64, 64)
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, 0, 10:30, 12:40] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.train()(x, masks)
        logits = model.eval()(x)
    assert backbone == [torch.bfloat16, torch.bfloat16]  # the backbone still runs in bfloat16
    assert decoded and set(decoded) == {torch.float32}
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert logits.dtype == torch.float32 and logits.shape == (2, 1, 64, 64)


# ------------------------------------------------------------------------------------------------ host reads


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts calls that read tensor values back to the host (each one a GPU synchronisation on CUDA)."""

    READS = {"item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_mask_rcnn_targets_come_from_the_host_masks():
    """Mask R-CNN gets the batch's masks as loaded (not the GPU copy) and reads them without another copy."""
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, 0, 4:10, 4:12] = 1
    masks[0, 0, 20:25, 20:30] = 1
    with HostReads() as reads:
        targets = maskrcnn_targets_from_masks(masks, device=torch.device("cpu"))
    assert reads.calls == ["numpy"]  # the host array itself; no .cpu() copy
    assert [len(t["boxes"]) for t in targets] == [2, 0]

    cfg = tiny_config(Path("."), Path("."), "model.name=maskrcnn", "model.params={}")
    seen = []

    class Detector(nn.Module):
        returns_loss_dict = True

        def forward(self, x, m):
            seen.append(m)
            return {}

    batch = {"image": torch.zeros(2, 1, 32, 32), "mask": masks}
    tasks_mod.build_task(cfg).outputs(Detector(), batch["image"], masks.clone(), batch)
    assert seen[0] is batch["mask"]


def test_method_losses_and_updates_never_read_device_values():
    """The multi-class and multi-task losses and an adversarial generator + discriminator update run on the
    'meta' device, whose tensors hold no values: any host read (int(), float(), .item(), a bool test) fails."""
    from busbench.methods.adversarial import AdversarialDeepSupervision
    from busbench.methods.multiclass import MulticlassLoss
    from busbench.methods.multitask import MultiTaskLoss

    meta = torch.device("meta")
    outputs = [torch.randn(2, 3, 32, 32, device=meta, requires_grad=True) for _ in range(3)]
    MulticlassLoss(ds_weights=[1, 0.5, 0.5])(outputs, torch.zeros(2, 32, 32, device=meta)).backward()
    seg = torch.randn(2, 1, 32, 32, device=meta, requires_grad=True)
    cls = torch.randn(2, 3, device=meta, requires_grad=True)
    criterion = MultiTaskLoss()
    loss = criterion((seg, cls), torch.zeros(2, 1, 32, 32, device=meta), torch.zeros(2, device=meta))
    loss.backward()
    assert {v.device for v in criterion.last_parts.values()} == {meta}

    model = create_model("unet_ds", image_size=32, base_width=2).to(meta)
    strategy = AdversarialDeepSupervision(image_channels=1, base_width=2).to(meta)
    logs = strategy.training_step(
        model,
        {"image": torch.randn(2, 1, 32, 32, device=meta), "mask": torch.zeros(2, 1, 32, 32, device=meta)},
        strategy.build_optimizers(model),
    )
    assert {v.device for v in logs.values()} == {meta}
    multitask = MultiTaskModel(create_model("unet", image_size=32, base_width=2)).to(meta)
    assert multitask(torch.randn(2, 1, 32, 32, device=meta))[1].shape == (2, 3)


# ------------------------------------------------------------------------------------------------ two processes


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("two_ranks")
    mp.start_processes(
        two_ranks.worker, args=(str(out / "init"), str(out)), nprocs=2, start_method="spawn", join=True
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_each_rank_resumes_its_own_cuda_generator(two_process_results):
    for rank, result in enumerate(two_process_results):
        assert result["restored"] == result["saved"] == [rank, 7 + 10 * (rank + 1), 7 + 10 * (rank + 1)]


def test_accumulation_under_ddp_all_reduces_once_per_step(two_process_results):
    torch.manual_seed(0)
    model = two_ranks.TinyNet()
    data = torch.randn(2, 4, 2, 3, generator=torch.Generator().manual_seed(1))
    expected = []
    for step in range(2):
        model.zero_grad(set_to_none=True)
        for rank in range(2):
            for i in (2 * step, 2 * step + 1):
                (model(data[rank, i]).pow(2).mean() / 2 / 2).backward()  # mean over ranks, 1/group per micro-batch
        expected.append(two_ranks.used_grads(model))
    for result in two_process_results:
        assert result["allreduce_calls"] == 2  # one bucket, two optimiser steps: not 4
        for got, want in zip(result["grads"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ bench/gpu.sh


@pytest.mark.slow
def test_gpu_check_dry_run_passes(tmp_path):
    """``bash bench/gpu.sh --dry-run``: the GPU check's whole script (data, both models, both settings, training,
    testing, the agreement check, the results section) at toy size on the CPU, so a GPU's first run of it is not
    its first run."""
    results = tmp_path / "results.md"
    # the interpreter running the tests comes first on PATH, so the script runs with it, activated or not
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        ["bash", "bench/gpu.sh", "--dry-run", "--results", str(results), "--workdir", str(tmp_path / "work")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("# busbench benchmark results") and "\n## gpu\n" in text
    rows = [line for line in text.splitlines() if line.startswith("| unet |") or line.startswith("| transunet |")]
    assert len(rows) == 2 and all(row.endswith("| pass |") and "| bfloat16 |" in row for row in rows)
