"""Plugins: a model and a dataset that live outside the package, used through the command line like built-ins.

The plugin module and the folder dataset are written to a temporary directory; busbench finds the module through
``BUSBENCH_PLUGINS`` and ``PYTHONPATH`` only. Nothing in ``src/`` names them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from busbench import plugins
from busbench.config import known_dataset_keys, load_config
from busbench.data.adapters import ADAPTERS
from busbench.errors import ConfigError
from busbench.models import registry

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "experiments" / "demo.yaml"

PLUGIN = textwrap.dedent(
    '''
    """An in-house network and an in-house dataset adapter, registered from outside busbench."""
    import numpy as np
    import torch
    from torch import nn

    from busbench.data.adapters import Adapter, DecodedSample, RawSample, register_adapter
    from busbench.models.base import SegModel
    from busbench.models.registry import register_model


    class LabNet(SegModel):
        """Conv, pool, conv, upsample, with a skip: the smallest U-shaped network."""

        size_multiple = 2

        def __init__(self, in_channels, num_classes, width):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
            self.bottleneck = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
            self.bottleneck_channels = 2 * width
            self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
            self.head = nn.Conv2d(2 * width, num_classes, 1)

        def encoder_modules(self):
            return [self.enc, self.bottleneck]

        def forward(self, x):
            self._check(x)
            skip = self.enc(x)
            return self.head(torch.cat([skip, self.up(self.bottleneck(skip))], dim=1))


    @register_model("lab_net", paper="in-house two-level U-Net", input_sizes="multiple of 2")
    def lab_net(in_channels=1, num_classes=1, image_size=224, width=4):
        return LabNet(in_channels, num_classes, width)


    @register_adapter
    class LabArchive(Adapter):
        key = "lab_archive"
        folder = "LabArchive"
        layout = "LabArchive/cases/*.npy"

        def is_dataset_dir(self, path):
            return (path / "cases").is_dir()

        def scan(self, dataset_dir):
            return []

        def decode(self, sample):
            raise NotImplementedError
    '''
)


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "busbench", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"busbench {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.slow
def test_outside_model_and_folder_dataset_through_the_cli(tmp_path: Path, folder_dataset) -> None:
    outside = tmp_path / "outside"
    (outside / "lab").mkdir(parents=True)
    (outside / "lab" / "__init__.py").write_text("")
    (outside / "lab" / "busbench_models.py").write_text(PLUGIN)
    dataset = folder_dataset(outside / "hospital_a_export", n=18, name="case {i:02d}", jpeg=True)
    data, results = tmp_path / "data", tmp_path / "results"
    env = {
        **os.environ,
        "BUSBENCH_PLUGINS": "lab.busbench_models",
        "PYTHONPATH": os.pathsep.join([str(outside), os.environ.get("PYTHONPATH", "")]),
        "BUSBENCH_DATA": str(data),
    }
    env.pop("BUSBENCH_CONFIGS", None)

    listed = _run(["models", "--names", "lab_*", "unet", "--size", "32", "--format", "csv"], env, tmp_path)
    rows = {r["key"]: r for r in csv.DictReader(io.StringIO(listed.stdout))}
    assert rows["lab_net"]["source"] == "plugin lab.busbench_models (BUSBENCH_PLUGINS)"
    assert rows["unet"]["source"] == "busbench"
    assert rows["lab_net"]["note"] == "" and rows["lab_net"]["params_m"] == "0.0"  # built at 32 px; 477 weights

    _run(
        ["prepare", "--layout", "folder", "--key", "hospital_a", "--dataset-dir", str(dataset), "--folds", "2",
         "--quiet"],
        env,
        tmp_path,
    )
    manifest = pd.read_csv(data / "manifests" / "hospital_a.csv", dtype=str, keep_default_na=False)
    summary = json.loads((data / "manifests" / "hospital_a.json").read_text())
    assert len(manifest) == 18 and set(manifest["dataset"]) == {"hospital_a"}
    assert manifest["sample_id"].str.fullmatch(r"case_\d\d").all()  # spaces in file names become '_'
    assert set(manifest["meta_scanner_model"]) == {"scanner-0", "scanner-1"}
    assert summary["patients"] == 9 and summary["counts"]["label"] == {"benign": 6, "malignant": 6, "normal": 6}
    for _, group in manifest.groupby("patient_id"):  # patient groups never cross test/dev or folds
        assert group["split"].nunique() == 1 and group["fold"].nunique() == 1
    _run(["audit", "hospital_a"], env, tmp_path)

    sets = [
        "data.dataset=hospital_a",
        f"output.root={results}",
        "data.image_size=32",
        "data.folds=2",
        "train.epochs=1",
        "train.batch_size=4",
        "output.overlays=0",
    ]
    runs = {}
    for model, params in (("lab_net", "model.params.width=4"), ("unet", "model.params.base_width=4")):
        _run(["train", "--config", str(DEMO), "--set", *sets, f"model.name={model}", params], env, tmp_path)
        runs[model] = results / "demo" / "hospital_a" / model
        _run(["test", "--run", str(runs[model])], env, tmp_path)
        scored = pd.read_csv(runs[model] / "summary.csv")
        assert len(scored) >= 3  # two folds and the ensemble
    board = _run(["aggregate", str(results / "demo"), "--out", str(results / "board")], env, tmp_path).stdout
    assert "| lab_net | demo | hospital_a | 2 |" in board and "| unet | demo | hospital_a | 2 |" in board
    _run(["compare", str(runs["lab_net"]), str(runs["unet"]), "--out", str(results / "cmp"), "--n-boot", "200",
          "--n-perm", "200"], env, tmp_path)
    assert any((results / "cmp").iterdir())

    # the same key, misspelled, is refused with the prepared key suggested
    bad = subprocess.run(
        [sys.executable, "-m", "busbench", "train", "--config", str(DEMO), "--set", "data.dataset=hospitl_a"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert "unknown dataset 'hospitl_a' (did you mean 'hospital_a'?)" in bad.stderr
    assert "--layout folder --key NAME" in bad.stderr


@pytest.fixture
def plugin_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The plugin module on sys.path and in BUSBENCH_PLUGINS, imported afresh; restored afterwards."""
    (tmp_path / "labplug").mkdir()
    (tmp_path / "labplug" / "__init__.py").write_text("")
    (tmp_path / "labplug" / "reg.py").write_text(PLUGIN.replace("lab_net", "labplug_net").replace(
        "lab_archive", "labplug_archive"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("BUSBENCH_PLUGINS", "labplug.reg")
    monkeypatch.setenv("BUSBENCH_DATA", str(tmp_path / "data"))
    saved = (dict(ADAPTERS), dict(registry._REGISTRY), dict(plugins._datasets))
    plugins.reset()
    yield tmp_path
    plugins.reset()
    for live, kept in zip((ADAPTERS, registry._REGISTRY, plugins._datasets), saved, strict=True):
        live.clear()
        live.update(kept)
    for name in [m for m in sys.modules if m == "labplug" or m.startswith("labplug.")]:
        del sys.modules[name]


def test_plugin_adapter_key_is_a_valid_dataset_in_configs(plugin_env: Path) -> None:
    from busbench.data.adapters import adapter_source, dataset_keys

    known = known_dataset_keys()
    assert known["labplug_archive"] == "plugin labplug.reg (BUSBENCH_PLUGINS)"
    assert known["busi"] == "busbench"
    assert "labplug_archive" in dataset_keys() and adapter_source("busi") == "busbench"
    assert registry.get_spec("labplug_net").source == "plugin labplug.reg (BUSBENCH_PLUGINS)"
    assert load_config(None, ["data.dataset=labplug_archive"]).data.dataset == "labplug_archive"
    (plugin_env / "data" / "manifests").mkdir(parents=True)
    (plugin_env / "data" / "manifests" / "clinic_b.csv").write_text("sample_id\n")
    assert known_dataset_keys()["clinic_b"] == "prepared"


def test_missing_or_broken_plugin_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_plugin.py").write_text("import numpy\nraise ValueError('bad weights path')\n")
    try:
        for value, message in (
            ("no_such_plugin_mod", r"'no_such_plugin_mod' \(from BUSBENCH_PLUGINS\) cannot be found; add the folder"),
            ("broken_plugin", r"'broken_plugin' \(from BUSBENCH_PLUGINS\) failed to import: ValueError: bad weights"),
        ):
            monkeypatch.setenv("BUSBENCH_PLUGINS", value)
            plugins.reset()
            with pytest.raises(ConfigError, match=message):
                plugins.load_plugins()
    finally:
        plugins.reset()
        sys.modules.pop("broken_plugin", None)
