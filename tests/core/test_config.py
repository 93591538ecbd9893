"""The config system: composition order, overrides, validation messages, resolved config on disk."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from busbench.config import Config, compose, config_from_file, load_config, save_config
from busbench.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture()
def configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private configs/ tree, so the tests don't depend on the shipped files' values."""
    root = tmp_path / "configs"
    write(root / "default.yaml", "train:\n  epochs: 50\n  lr: 1.0e-3\nmodel:\n  name: unet\n")
    write(root / "datasets" / "busbra.yaml", "data:\n  dataset: busbra\n  image_size: 256\n")
    write(root / "models" / "unet.yaml", "model:\n  name: unet\n  params: {base_width: 64}\n")
    write(root / "models" / "unext.yaml", "model:\n  name: unext\n  params: {dims: [16, 32]}\n")
    monkeypatch.setenv("BUSBENCH_CONFIGS", str(root))
    return root


def test_schema_defaults_match_the_documented_default_yaml(monkeypatch):
    """configs/default.yaml documents every key; it must equal the schema defaults exactly."""
    monkeypatch.delenv("BUSBENCH_CONFIGS", raising=False)
    shipped = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert shipped == Config().to_dict()


def test_composition_order(configs: Path):
    exp = write(
        configs / "experiments" / "e.yaml",
        "experiment: {name: e1}\ndata: {dataset: busbra}\ntrain: {epochs: 7}\n",
    )
    cfg = load_config(exp)
    assert cfg.experiment.name == "e1"
    assert cfg.train.epochs == 7  # experiment beats default.yaml
    assert cfg.train.lr == 1e-3  # default.yaml beats the schema
    assert cfg.data.image_size == 256  # datasets/busbra.yaml applied
    assert cfg.model.params == {"base_width": 64}  # models/unet.yaml applied
    assert cfg.train.batch_size == 16  # schema default


def test_overrides_win_and_parse_types(configs: Path):
    cfg = load_config(
        None, ["train.lr=3e-4", "data.image_size=128", "train.grad_clip=1", "model.params.base_width=8"]
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.image_size == 128
    assert cfg.train.grad_clip == 1.0
    assert cfg.model.params == {"base_width": 8}


def test_swapping_the_model_brings_its_own_params(configs: Path):
    exp = write(configs / "experiments" / "e.yaml", "model:\n  name: unet\n  params: {base_width: 4}\n")
    assert load_config(exp).model.params == {"base_width": 4}
    cfg = load_config(exp, ["model.name=unext"])
    assert cfg.model.name == "unext"
    assert cfg.model.params == {"dims": [16, 32]}


def test_dataset_list_for_unions(configs: Path):
    cfg = load_config(None, ["data.dataset=[busi, busbra]"])
    assert cfg.data.datasets == ["busi", "busbra"]
    assert cfg.run_dir().as_posix() == "results/default/busi+busbra/unet"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
        ("trian.lr=1", "unknown config key 'trian'; did you mean 'train'?"),
        ("data.imagesize=64", "did you mean 'data.image_size'?"),
    ],
)
def test_unknown_key_names_full_path_and_suggestion(configs: Path, override: str, fragment: str):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr=-0.1", "train.lr"),
        ("train.lr=fast", "train.lr"),
        ("data.folds=1", "data.folds"),
        ("data.image_size=0", "data.image_size"),
        ("data.image_size=abc", "data.image_size"),
        ("data.test_size=1.0", "data.test_size"),
        ("data.test_size=0", "data.test_size"),
        ("train.optimizer=adam", "train.optimizer"),
        ("data.channels=2", "data.channels"),
        ("train.batch_size=0", "train.batch_size"),
        ("experiment.name=../escape", "experiment.name"),
    ],
)
def test_wrong_type_or_range_names_the_key(configs: Path, override: str, key: str):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"'{key}'" in str(err.value)


def test_unknown_dataset_suggests(configs: Path):
    with pytest.raises(ConfigError, match=r"unknown dataset 'bussi' \(did you mean 'busi'\?\)"):
        load_config(None, ["data.dataset=bussi"])


def test_section_must_be_mapping(configs: Path):
    exp = write(configs / "experiments" / "bad.yaml", "train: 5\n")
    with pytest.raises(ConfigError, match="'train' must be a mapping"):
        load_config(exp)


def test_not_yaml_and_missing_file(configs: Path, tmp_path: Path):
    bad = write(tmp_path / "bad.yaml", "train: {epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line"):
        load_config(bad)
    scalar = write(tmp_path / "scalar.yaml", "just a string\n")
    with pytest.raises(ConfigError, match="must hold a YAML mapping"):
        load_config(scalar)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["train.lr"])


def test_yaml_tags_are_not_executed(configs: Path, tmp_path: Path):
    evil = write(tmp_path / "evil.yaml", "train: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_resolved_config_round_trips(configs: Path, tmp_path: Path):
    cfg = load_config(None, ["train.lr=2e-4", "experiment.name=rt"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    again = config_from_file(out)
    assert again == cfg
    assert again.hash() == cfg.hash()
    assert load_config(None, ["train.lr=3e-4"]).hash() != cfg.hash()


def test_shipped_configs_all_validate(monkeypatch):
    monkeypatch.delenv("BUSBENCH_CONFIGS", raising=False)
    files = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
    for path in files:
        load_config(path)
    for key_file in sorted((REPO / "configs" / "datasets").glob("*.yaml")):
        assert load_config(None, [f"data.dataset={key_file.stem}"]).data.dataset == key_file.stem


def test_compose_without_any_configs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("BUSBENCH_CONFIGS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert compose(None, ["train.epochs=3"]) == {"train": {"epochs": 3}}
    assert load_config(None, ["train.epochs=3"]).train.epochs == 3
