"""What a busbench command imports before it does any work.

Every ``busbench train``/``test``/``predict`` call is a fresh process, and a sweep starts one per run and step, so
start-up time is paid many times over. segmentation_models_pytorch imports timm, timm imports torchvision, and
torchvision imports torch's compiler (about 3 s together on a CPU); scikit-learn takes about 1 s more. busbench
imports them only where a model, loss or metric needs them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from busbench.errors import ModelError
from busbench.models import create_model, list_models, smp_family

HEAVY = ("segmentation_models_pytorch", "timm", "torchvision", "torch._dynamo", "sklearn")


STAGES = {
    # the start of busbench test / predict, and of train up to its loss, with busbench's own models
    "commands and own models": (
        "import busbench.cli, busbench.engine.evaluate, busbench.engine.predict, busbench.engine.train\n"
        "from busbench.models import create_model, list_models\n"
        "assert {'smp_unet', 'transunet', 'swinunet', 'maskrcnn'} <= set(list_models())\n"
        "for name in ('unet', 'unext', 'cmunet', 'ukan'):\n"
        "    create_model(name, image_size=64)\n"
    ),
    "training loss": "from busbench.losses import build_criterion\nbuild_criterion('bce_dice')\n",
    "image-label scores": (
        "from busbench.methods.multitask import classification_metrics\nclassification_metrics([0, 1], [0, 0])\n"
    ),
}


def test_heavy_libraries_are_imported_only_when_a_loss_or_metric_needs_them():
    """One fresh interpreter runs the stages in order and reports what is imported after each."""
    probe = "import json, sys\nloaded = {}\n"
    for stage, code in STAGES.items():
        probe += f"{code}loaded[{stage!r}] = [m for m in {HEAVY!r} if m in sys.modules]\n"
    probe += "print(json.dumps(loaded))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out.splitlines()[-1])
    assert loaded == {
        "commands and own models": [],
        "training loss": ["segmentation_models_pytorch", "timm", "torchvision", "torch._dynamo"],
        "image-label scores": list(HEAVY),
    }


def test_every_smp_architecture_is_listed_and_one_the_installed_smp_lacks_says_so(monkeypatch):
    assert {f"smp_{short}" for short in smp_family.SMP_ARCHS} <= set(list_models("smp_*"))
    installed = smp_family._installed_archs()
    monkeypatch.setattr(
        smp_family, "_installed_archs", lambda: {k: v for k, v in installed.items() if k != "dpt"}
    )
    with pytest.raises(ModelError, match=r"smp architecture 'dpt' is not in the installed .*pip install -U"):
        create_model("smp_dpt", image_size=160, encoder="tu-test_vit.r160_in1k")
