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
import time
from pathlib import Path

import pandas as pd
import pytest

from busbench import cli, plugins
from busbench.config import BUILTIN_DATASET_KEYS, known_dataset_keys, load_config
from busbench.data.adapters import ADAPTERS, load_adapters
from busbench.errors import BusbenchError, ConfigError
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


@pytest.fixture
def outside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The plugin module in ``<tmp>/outside/lab/``, named by BUSBENCH_PLUGINS and found on the import path only.

    Registries are restored afterwards, so the plugin's model and adapter do not leak into other tests.
    """
    load_adapters(), registry.model_specs()  # built-ins registered before the snapshot
    saved = (dict(ADAPTERS), dict(registry._REGISTRY), dict(plugins._datasets))
    folder = tmp_path / "outside"
    (folder / "lab").mkdir(parents=True)
    (folder / "lab" / "__init__.py").write_text("")
    (folder / "lab" / "busbench_models.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("BUSBENCH_PLUGINS", "lab.busbench_models")
    monkeypatch.setenv("BUSBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("BUSBENCH_CONFIGS", raising=False)
    plugins.reset()
    yield folder
    plugins.reset()
    for live, kept in zip((ADAPTERS, registry._REGISTRY, plugins._datasets), saved, strict=True):
        live.clear()
        live.update(kept)
    for name in [m for m in sys.modules if m == "lab" or m.startswith("lab.")]:
        del sys.modules[name]


def _cli(*argv: str) -> None:
    start = time.perf_counter()
    code = cli.main(list(argv))
    print(f"{time.perf_counter() - start:6.1f} s  busbench {' '.join(argv)}", file=sys.__stderr__)  # pytest -s
    assert code == 0, f"busbench {' '.join(argv)} exited {code}"


@pytest.mark.slow
def test_outside_model_and_folder_dataset_through_the_cli(
    tmp_path: Path, outside: Path, folder_dataset, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    dataset = folder_dataset(outside / "hospital_a_export", n=18, name="case {i:02d}", jpeg=True)
    data, results = tmp_path / "data", tmp_path / "results"
    monkeypatch.chdir(tmp_path)

    # a fresh interpreter finds the plugin through the two variables alone
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(outside), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    listed = subprocess.run(
        [sys.executable, "-m", "busbench", "models", "--names", "lab_*", "unet", "--size", "32", "--format", "csv"],
        env=env, capture_output=True, text=True, timeout=600, check=True,
    )
    print(f"{time.perf_counter() - start:6.1f} s  busbench models --names lab_* unet --size 32 --format csv",
          file=sys.__stderr__)
    rows = {r["key"]: r for r in csv.DictReader(io.StringIO(listed.stdout))}
    assert rows["lab_net"]["source"] == "plugin lab.busbench_models (BUSBENCH_PLUGINS)"
    assert rows["unet"]["source"] == "busbench"
    assert rows["lab_net"]["note"] == "" and rows["lab_net"]["params_m"] == "0.0"  # built at 32 px; 477 weights

    _cli("prepare", "--layout", "folder", "--key", "hospital_a", "--dataset-dir", str(dataset), "--folds", "2",
         "--quiet")
    manifest = pd.read_csv(data / "manifests" / "hospital_a.csv", dtype=str, keep_default_na=False)
    summary = json.loads((data / "manifests" / "hospital_a.json").read_text())
    assert len(manifest) == 18 and set(manifest["dataset"]) == {"hospital_a"}
    assert manifest["sample_id"].str.fullmatch(r"case_\d\d").all()  # spaces in file names become '_'
    assert set(manifest["meta_scanner_model"]) == {"scanner-0", "scanner-1"}
    assert summary["patients"] == 9 and summary["counts"]["label"] == {"benign": 6, "malignant": 6, "normal": 6}
    for _, group in manifest.groupby("patient_id"):  # patient groups never cross test/dev or folds
        assert group["split"].nunique() == 1 and group["fold"].nunique() == 1
    _cli("audit", "hospital_a")

    sets = [
        "data.dataset=hospital_a",
        f"output.root={results}",
        "data.image_size=32",
        "data.folds=2",
        "train.epochs=1",
        "train.batch_size=4",
        "output.overlays=0",
        "model.name=lab_net",
    ]
    runs = {}
    for name, width in (("narrow", 4), ("wide", 8)):  # two variants of the plugin model, compared below
        _cli("train", "--config", str(DEMO), "--set", *sets, f"experiment.name={name}", f"model.params.width={width}")
        runs[name] = results / name / "hospital_a" / "lab_net"
        _cli("test", "--run", str(runs[name]))
        scored = pd.read_csv(runs[name] / "summary.csv")
        assert len(scored) >= 3 and scored["dice"].between(0, 1).all()  # two folds and the ensemble
    capsys.readouterr()
    _cli("aggregate", str(results / "narrow"), str(results / "wide"), "--out", str(results / "board"))
    board = capsys.readouterr().out
    assert "| lab_net | narrow | hospital_a | 2 |" in board and "| lab_net | wide | hospital_a | 2 |" in board
    _cli("compare", str(runs["narrow"]), str(runs["wide"]), "--out", str(results / "cmp"), "--n-boot", "200",
         "--n-perm", "200")
    pairwise = pd.read_csv(results / "cmp" / "pairwise.csv")
    assert len(pairwise) > 0 and pairwise.astype(str).apply(lambda c: c.str.contains("lab_net")).any().any()


def test_plugin_adapter_key_is_a_valid_dataset_in_configs(outside: Path, tmp_path: Path) -> None:
    from busbench.data.adapters import adapter_source, dataset_keys

    known = known_dataset_keys()
    assert known["lab_archive"] == "plugin lab.busbench_models (BUSBENCH_PLUGINS)"
    assert known["busi"] == "busbench"
    assert "lab_archive" in dataset_keys() and adapter_source("busi") == "busbench"
    assert registry.get_spec("lab_net").source == "plugin lab.busbench_models (BUSBENCH_PLUGINS)"
    assert load_config(None, ["data.dataset=lab_archive"]).data.dataset == "lab_archive"
    (tmp_path / "data" / "manifests").mkdir(parents=True)
    (tmp_path / "data" / "manifests" / "clinic_b.csv").write_text("sample_id\n")
    assert known_dataset_keys()["clinic_b"] == "prepared"
    with pytest.raises(ConfigError, match=r"unknown dataset 'clinic_c' \(did you mean 'clinic_b'\?\)"):
        load_config(None, ["data.dataset=clinic_c"])


def test_entry_point_group_declares_plugins(outside: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed distribution declaring ``[busbench.plugins]`` is imported without BUSBENCH_PLUGINS."""
    monkeypatch.delenv("BUSBENCH_PLUGINS")
    info = outside / "lab_models-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lab-models\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[busbench.plugins]\nlab = lab.busbench_models\n")
    loaded = plugins.load_plugins()
    assert [p.module for p in loaded] == ["lab.busbench_models"]
    assert registry.get_spec("lab_net").source == "plugin lab.busbench_models (entry point lab (lab-models))"
    assert set(BUILTIN_DATASET_KEYS) == {k for k, c in ADAPTERS.items() if c.__module__.startswith("busbench.")}


def test_missing_or_broken_plugin_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_plugin.py").write_text("import numpy\nraise ValueError('bad weights path')\n")
    (tmp_path / "clash_plugin.py").write_text(
        "from busbench.models.registry import register_model\n\n\n"
        "@register_model('unet', paper='x', input_sizes='any')\ndef unet(**kwargs):\n    return None\n"
    )
    registry.model_specs()
    try:
        for value, message in (
            ("clash_plugin", r"model 'unet' from plugin clash_plugin \(BUSBENCH_PLUGINS\) is already registered by busbench"),
            ("no_such_plugin_mod", r"'no_such_plugin_mod' \(from BUSBENCH_PLUGINS\) cannot be found; add the folder"),
            ("broken_plugin", r"'broken_plugin' \(from BUSBENCH_PLUGINS\) failed to import: ValueError: bad weights"),
        ):
            monkeypatch.setenv("BUSBENCH_PLUGINS", value)
            plugins.reset()
            with pytest.raises(BusbenchError, match=message):
                plugins.load_plugins()
    finally:
        plugins.reset()
        sys.modules.pop("broken_plugin", None)
        sys.modules.pop("clash_plugin", None)
