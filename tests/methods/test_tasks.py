"""The task layer between the trainer/evaluator and the methods: refinement, class maps, losses, config checks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from busbench.config import load_config
from busbench.data.loader import EpochSampler
from busbench.engine import tasks
from busbench.engine.train import train
from busbench.errors import ConfigError
from busbench.methods.multiclass import CLASS_NAMES, predicted_classes
from busbench.metrics import per_class
from busbench.models.base import SegModel

REPO = Path(__file__).resolve().parents[2]


def cfg_with(*sets: str):
    return load_config(None, ["data.image_size=32", "model.params={base_width: 4}", *sets])


def test_refinement_empties_normal_masks_and_unsets_normal_for_lesions() -> None:
    task = tasks.build_task(cfg_with("task.mode=multitask"))
    lesion = torch.zeros(1, 3, 4, 4)
    lesion[0, 0, 1, 1] = 0.9  # image 0: lesion pixels but classified normal
    lesion[0, 1, 2, 2] = (
        0.5  # image 1: one pixel exactly at the threshold (the evaluator counts it as lesion)
    )
    image = torch.tensor([[[0.6, 0.3, 0.1], [0.3, 0.5, 0.2], [0.2, 0.5, 0.3]]])  # image 2: benign, empty mask
    out = task.finalize(tasks.Prediction(lesion=lesion, image=image), threshold=0.5)
    assert out.lesion[0, 0].max() == 0  # normal => empty
    assert out.image[0, 0].tolist() == pytest.approx([0.6, 0.3, 0.1])  # its label stays normal
    assert out.image[0, 1].tolist() == pytest.approx([0.0, 0.5 / 0.7, 0.2 / 0.7])  # lesion => not normal
    assert torch.equal(out.lesion[0, 1], lesion[0, 1])
    assert out.image[0, 2].tolist() == pytest.approx([0.2, 0.5, 0.3])  # lesion class with an empty mask: kept
    assert torch.equal(
        image, torch.tensor([[[0.6, 0.3, 0.1], [0.3, 0.5, 0.2], [0.2, 0.5, 0.3]]])
    )  # inputs kept

    raw = tasks.build_task(cfg_with("task.mode=multitask", "task.refine=false"))
    same = raw.finalize(tasks.Prediction(lesion=lesion, image=image), threshold=0.5)
    assert torch.equal(same.lesion, lesion) and torch.equal(same.image, image)


def test_ensemble_averages_every_probability() -> None:
    pred = tasks.Prediction(
        lesion=torch.rand(2, 3, 4, 4), pixel=torch.rand(2, 3, 3, 4, 4), image=torch.rand(2, 3, 3)
    )
    ens = pred.with_ensemble()
    for full, part in ((ens.lesion, pred.lesion), (ens.pixel, pred.pixel), (ens.image, pred.image)):
        assert full.shape[0] == 3
        torch.testing.assert_close(full[2], part.mean(dim=0))


def test_multiclass_columns_match_an_independent_label_map() -> None:
    task = tasks.build_task(cfg_with("task.mode=multiclass"))
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 3, 16, 16, generator=gen) * 3
    probs = torch.softmax(logits, dim=2)
    pred = tasks.Prediction(lesion=1 - probs[:, :, 0], pixel=probs)
    gt = np.zeros((16, 16), np.uint8)
    gt[2:9, 3:10], gt[11:15, 10:15] = 1, 2
    for j in range(2):
        cols = task.image_columns(pred, 0, j, 0.5, gt)
        labels = predicted_classes(logits[0, j : j + 1], 0.5)[0].numpy()
        expected = per_class(labels, gt, 3, class_names=CLASS_NAMES)
        for key, value in cols.items():
            assert value == pytest.approx(expected[key]), key
    rows = pd.DataFrame(
        [
            {"label": label, **task.image_columns(pred, 0, j, 0.5, gt)}
            for j, label in enumerate(["benign", "normal"])
        ]
    )
    scores = task.summary_scores(rows)
    assert scores["dice_benign"] == pytest.approx(rows["dice_benign"].mean())
    assert scores["dice_benign_only"] == pytest.approx(rows["dice_benign"][0])
    assert np.isnan(scores["dice_malignant_only"])  # no malignant image: an average over nothing
    assert scores["hd95_penalised_malignant"] == rows["penalised_malignant"].sum()


class LossDictModel(SegModel):
    """A model that returns its own losses in training mode, like Mask R-CNN."""

    returns_loss_dict = True

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, masks=None):
        return {"a": self.w * x.mean(), "b": (self.w * masks).sum()}


def test_models_with_their_own_losses_train_on_the_sum() -> None:
    task = tasks.build_task(cfg_with())
    model = LossDictModel()
    x, y = torch.ones(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    loss = task.loss(task.criterion(), task.outputs(model, x, y), {}, y)
    assert loss.item() == pytest.approx(2.0 + 2.0 * 32)
    loss.backward()
    assert model.w.grad.item() == pytest.approx(1.0 + 32)


def test_epoch_sampler_with_repeated_indices() -> None:
    plain = EpochSampler(5, shuffle=True, seed=3)
    explicit = EpochSampler(5, shuffle=True, seed=3, indices=range(5))
    assert list(plain) == list(explicit)  # the default is the identity list
    items = [0, 0, 1, 2, 2, 2]
    sampler = EpochSampler(3, shuffle=True, seed=3, indices=items)
    first = list(sampler)
    assert len(sampler) == 6 and Counter(i for i, _ in first) == Counter(items)
    assert len({s for _, s in first}) == 6  # every copy of a repeated item is augmented differently
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(sampler) != first  # the next epoch reshuffles
    with pytest.raises(ValueError, match="0..2"):
        EpochSampler(3, shuffle=True, seed=0, indices=[0, 3])


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("train.strategy=adversarial_ds", "train.accumulate=2"), "train.accumulate must be 1"),
        (("train.strategy=adversarial_ds", "task.mode=multiclass"), "task.mode must be binary"),
        (("task.mode=multiclass", "train.loss=focal"), "train.loss must be one of bce_dice, bce, dice"),
        (("task.multitask_lambda=1.5",), "task.multitask_lambda"),
        (("task.mode=segmentation",), "task.mode"),
    ],
)
def test_conflicting_settings_are_config_errors(sets, message) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg_with(*sets)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("model.name=unet", "train.strategy=adversarial_ds"), "returns 1 output"),
        (("model.name=maskrcnn", "model.params={}", "task.mode=multitask"), "computes its own losses"),
        (("model.name=maskrcnn", "model.params={}", "task.mode=multiclass"), "needs a model with 3 output"),
    ],
)
def test_models_a_method_cannot_train_fail_before_anything_is_written(tmp_path, sets, message) -> None:
    cfg = cfg_with(f"output.root={tmp_path / 'results'}", f"data.data_root={tmp_path / 'none'}", *sets)
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not (tmp_path / "results").exists()


METHOD_CONFIGS = {
    "uclm_unet_3class.yaml": ("multiclass", "standard"),
    "curated_busi_multitask.yaml": ("multitask", "standard"),
    "usseg_deep_supervision.yaml": ("binary", "adversarial_ds"),
    "cheng_unet_busi.yaml": ("binary", "standard"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_shipped_method_configs_build_their_models(monkeypatch, name) -> None:
    """Each method config's network is built at full size and passes its task's checks (one forward at most)."""
    monkeypatch.delenv("BUSBENCH_CONFIGS", raising=False)
    cfg = load_config(REPO / "configs" / "experiments" / name)
    assert (cfg.task.mode, cfg.train.strategy) == METHOD_CONFIGS[name]
    task = tasks.build_task(cfg)
    model = task.build_model()
    task.check_model(model)
    if name == "cheng_unet_busi.yaml":
        rates = [stage.rate for stage in [*model.encoder, model.bottleneck]]
        assert rates == [0.1, 0.1, 0.2, 0.2, 0.2] and model.bottleneck_channels == 512
