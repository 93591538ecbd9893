"""Bad configurations and bad command arguments through ``busbench train``, ``audit`` and ``test``.

Each case runs the real command line against a tiny prepared synthetic dataset (or against none, where the check
comes first) and checks one error line naming the key or file and the fix, a non-zero exit, and that neither the
data root (manifests, derived masks, cache) nor the results folder changed: a configuration error must be caught
before a run folder is created.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import yaml
from badinput_testdata import assert_unchanged, run_cli, run_subprocess, snapshot

from busbench.config import load_config, save_config
from busbench.models.registry import list_models


def experiment(prepared: Path, results: Path, **sections: dict) -> dict:
    """A tiny, valid experiment on the prepared dataset; ``sections`` replace keys section by section."""
    base = {
        "experiment": {"name": "bad-config"},
        "data": {
            "dataset": "busi",
            "data_root": str(prepared),
            "image_size": 32,
            "folds": 2,
            "num_workers": 0,
        },
        "model": {"name": "unet", "params": {"base_width": 4}},
        "train": {"epochs": 1, "batch_size": 4},
        "output": {"root": str(results), "tensorboard": False},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


@pytest.fixture
def train_fails(prepared: Path, tmp_path: Path, capsys, configs_env):
    """``train_fails(config_text_or_mapping, *sets) -> (message, config path)``: asserts the failure contract."""

    def run(config: dict | str | bytes, *sets: str) -> tuple[str, Path]:
        path = tmp_path / "experiment.yaml"
        if isinstance(config, dict):
            path.write_text(yaml.safe_dump(config, sort_keys=False))
        elif isinstance(config, str):
            path.write_text(config)
        else:
            path.write_bytes(config)
        results = tmp_path / "results"
        data_before = snapshot(prepared)
        args = ["train", "--config", path, *(["--set", *sets] if sets else [])]
        message = run_cli(capsys, *args).error_line("train")
        assert_unchanged(data_before, prepared)
        assert not results.exists(), f"a failed configuration left {sorted(results.rglob('*'))}"
        return message, path

    return run


# ----------------------------------------------------------------------------------------------- keys and types


def test_unknown_key_in_the_config_file(train_fails, prepared, tmp_path):
    message, path = train_fails(experiment(prepared, tmp_path / "results", train={"epoch": 3}))
    assert message == f"{path}: unknown config key 'train.epoch'; did you mean 'train.epochs'?"


def test_unknown_key_on_the_command_line(train_fails, prepared, tmp_path):
    message, path = train_fails(experiment(prepared, tmp_path / "results"), "data.bogus=1")
    assert message.startswith(
        f"{path}: unknown config key 'data.bogus'; valid keys here: dataset, data_root,"
    )


@pytest.mark.parametrize(
    ("section", "values", "key", "expected"),
    [
        ("train", {"epochs": "three"}, "train.epochs", "Input should be a valid integer"),
        ("data", {"image_size": [64, 64]}, "data.image_size", "Input should be a valid integer"),
        ("train", {"lr": "fast"}, "train.lr", "Input should be a valid number"),
        ("data", {"resize": "stretch"}, "data.resize", "Input should be 'letterbox' or 'resize'"),
    ],
)
def test_wrong_type(train_fails, prepared, tmp_path, section, values, key, expected):
    message, path = train_fails(experiment(prepared, tmp_path / "results", **{section: values}))
    value = next(iter(values.values()))
    assert message.startswith(f"{path}: config key '{key}' {expected}")
    assert message.endswith(f"(got {value!r})")


def test_one_fold_is_refused(train_fails, prepared, tmp_path):
    message, path = train_fails(experiment(prepared, tmp_path / "results"), "data.folds=1")
    assert message == f"{path}: config key 'data.folds' Input should be greater than or equal to 2 (got 1)"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", "greater than 0 (got 0)"),
        ("0.0", "greater than 0 (got 0.0)"),
        ("1", "less than 1 (got 1)"),
        ("1.5", "less than 1 (got 1.5)"),
        ("-0.2", "greater than 0 (got -0.2)"),
    ],
)
def test_test_size_outside_the_open_unit_interval(train_fails, prepared, tmp_path, value, expected):
    message, path = train_fails(experiment(prepared, tmp_path / "results"), f"data.test_size={value}")
    assert message == f"{path}: config key 'data.test_size' Input should be {expected}"


# --------------------------------------------------------------------------------------------- model and data


def test_image_size_the_model_cannot_take(train_fails, prepared, tmp_path):
    """U-Net pools four times, so 50 px cannot work; this must fail before any results folder exists."""
    message, _ = train_fails(experiment(prepared, tmp_path / "results", data={"image_size": 50}))
    assert message == (
        "UNet needs input height and width that are positive multiples of 16, got 50x50; "
        "set data.image_size to a multiple of 16"
    )


def test_unknown_model_lists_the_valid_names(train_fails, prepared, tmp_path):
    message, _ = train_fails(experiment(prepared, tmp_path / "results", model={"name": "unett"}))
    assert message.startswith("unknown model 'unett'. Did you mean 'unet'? Valid models: ")
    listed = message.split("Valid models: ", 1)[1].split(", ")
    assert listed == list_models() and {"unet", "attunet", "unetpp", "unext", "transunet"} <= set(listed)


def test_unknown_model_parameter(train_fails, prepared, tmp_path):
    message, _ = train_fails(experiment(prepared, tmp_path / "results"), "model.params.depth=3")
    assert message.startswith("model.params.depth is not an option of unet. Accepted: ")
    assert "base_width" in message.split("Accepted: ", 1)[1]


def test_missing_manifest(train_fails, tmp_path):
    """No dataset prepared at data.data_root: the message names the manifest path and the prepare command."""
    empty = tmp_path / "nodata"
    empty.mkdir()
    message, _ = train_fails(experiment(empty, tmp_path / "results"))
    manifest = empty / "manifests" / "busi.csv"
    assert message.startswith(f"manifest {manifest} not found; ")
    assert "busbench prepare --datasets busi" in message
    assert not any(empty.iterdir())


# -------------------------------------------------------------------------------------------- not a YAML file


def png_bytes() -> bytes:
    """A real one-pixel PNG: the kind of file a user passes as --config by mistake."""
    row = b"\x00\x80"
    chunks = [
        (b"IHDR", (1).to_bytes(4, "big") * 2 + b"\x08\x00\x00\x00\x00"),
        (b"IDAT", zlib.compress(row)),
        (b"IEND", b""),
    ]
    out = b"\x89PNG\r\n\x1a\n"
    for kind, data in chunks:
        out += len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    return out


def test_binary_file_as_config(train_fails):
    message, path = train_fails(png_bytes())
    assert message == f"{path} is not a UTF-8 text file; a config must be YAML text"


def test_utf16_config(train_fails, prepared, tmp_path):
    """UTF-16 without a byte-order mark decodes as UTF-8 full of NULs, which YAML refuses: still one line."""
    text = yaml.safe_dump(experiment(prepared, tmp_path / "results"))
    message, path = train_fails(text.encode("utf-16-le"))
    assert message == (
        f"{path} is not YAML text: character #x0000 at position 1 (special characters are not allowed); "
        "a config must be YAML saved as UTF-8 text"
    )


def test_broken_yaml(train_fails):
    message, path = train_fails("data:\n  dataset: [busi\n  image_size: 32\n")
    assert message.startswith(f"{path} is not valid YAML at line ")


def test_yaml_that_is_not_a_mapping(train_fails):
    message, path = train_fails("- data\n- model\n")
    assert message == f"{path} must hold a YAML mapping of sections (experiment:, data:, ...), got list"


def test_missing_config_file(tmp_path, capsys, configs_env):
    path = tmp_path / "experiments" / "nope.yaml"
    message = run_cli(capsys, "train", "--config", path).error_line("train")
    assert message == f"config file {path} does not exist; check the path (configs live under configs/)"
    assert not any(tmp_path.iterdir())


def test_broken_yaml_exit_status_of_the_real_command(tmp_path, configs_env):
    """The same contract seen from outside: the console command's exit status and its stderr bytes."""
    path = tmp_path / "experiment.yaml"
    path.write_text("train:\n  epochs: 3\n   lr: 0.1\n")
    result = run_subprocess("train", "--config", path, cwd=tmp_path)
    assert result.code == 1
    assert result.error_line("train").startswith(f"{path} is not valid YAML at line 3, column ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiment.yaml"]


# ---------------------------------------------------------------------------------------------- audit and test


def test_audit_of_a_missing_manifest(tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    message = run_cli(capsys, "audit", "busi", "--data-root", root).error_line("audit")
    assert message == (
        f"manifest {root / 'manifests' / 'busi.csv'} not found; run busbench prepare --datasets busi first, "
        "or pass --data-root / --manifests pointing at the folder that holds it"
    )
    assert not any(root.iterdir())


@pytest.mark.parametrize("kind", ["empty folder", "missing folder", "a file"])
def test_test_on_something_that_is_not_a_run(tmp_path, capsys, kind):
    target = tmp_path / "run"
    if kind == "empty folder":
        target.mkdir()
    elif kind == "a file":
        target.write_text("not a run\n")
    before = snapshot(tmp_path)
    message = run_cli(capsys, "test", "--run", target).error_line("test")
    assert message == (
        f"{target / 'config.yaml'} not found; --run must be a run folder written by busbench train "
        "(<output.root>/<experiment>/<dataset>/<model>)"
    )
    assert_unchanged(before, tmp_path)


def test_test_on_a_run_without_trained_folds(prepared, tmp_path, capsys, configs_env):
    """A run folder whose folds were never trained: names the missing checkpoints and the train command."""
    cfg = load_config(
        None, [f"data.data_root={prepared}", f"output.root={tmp_path / 'results'}", "data.folds=2"]
    )
    run_dir = cfg.run_dir()
    save_config(cfg, run_dir / "config.yaml")
    before = snapshot(tmp_path)
    data_before = snapshot(prepared)
    message = run_cli(capsys, "test", "--run", run_dir).error_line("test")
    assert message == (
        f"{run_dir}: fold(s) [0, 1] have no checkpoint_best.pt; data.folds=2 fold models are needed. "
        f"Train them first: busbench train --config {run_dir / 'config.yaml'} --fold 0 --fold 1"
    )
    assert_unchanged(before, tmp_path)
    assert_unchanged(data_before, prepared)
