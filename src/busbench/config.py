"""Typed, validated run configuration.

A run's configuration is composed from YAML files and command-line overrides, in this order (later wins):

1. the schema defaults below (documented key by key in ``configs/default.yaml``);
2. ``configs/default.yaml``;
3. ``configs/datasets/<data.dataset>.yaml`` and ``configs/models/<model.name>.yaml``, for the dataset and model the
   final configuration names (so ``--set model.name=unext`` brings in UNeXt's own model file, not UNet's);
4. the experiment file given with ``--config``;
5. ``--set a.b=value`` overrides, each value parsed as YAML (``--set train.lr=3e-4 data.image_size=256``).

The merged mapping is checked against the schema: an unknown key fails with its full path and the closest valid key,
and a wrong type or an out-of-range value fails naming the key. YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from busbench import plugins
from busbench.atomic import atomic_write_text
from busbench.errors import BusbenchError, ConfigError

BUILTIN_DATASET_KEYS = ("busi", "curated_busi", "busbra", "bus_uc", "bus_uclm", "yap2018")
"""Keys of the datasets busbench ships adapters for. Configs accept these, the keys of plugin adapters and every
dataset prepared under the data root (see :func:`known_dataset_keys`)."""
DATASET_KEYS = BUILTIN_DATASET_KEYS  # the built-in keys only; check a key with dataset_key_problem()
DATA_ENV = "BUSBENCH_DATA"
DEFAULT_DATA_ROOT = "data"
_DATASET_KEY = re.compile(r"^[a-z0-9][a-z0-9_]*$")
# Datasets holding the same images under the same sample ids (Curated BUSI is BUSI minus near-duplicates); a key
# not listed is its own family. busbench.data.leakage uses this to keep learned images out of every test.
IMAGE_FAMILIES = {"busi": "busi", "curated_busi": "busi"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ExperimentConfig(_Section):
    name: str = "default"
    description: str = ""

    @field_validator("name")
    @classmethod
    def _safe(cls, v: str) -> str:
        if not _SAFE_NAME.match(v):
            raise ValueError("must be a folder-safe name: letters, digits, '.', '_', '+', '-'")
        return v


class DataConfig(_Section):
    dataset: str | list[str] = "busi"
    data_root: str | None = None
    image_size: int = Field(224, gt=0, le=4096)
    resize: Literal["letterbox", "resize"] = "letterbox"
    channels: Literal[1, 3] = 1
    normalize: Literal["unit", "per_image", "imagenet"] = "unit"
    folds: int = Field(5, ge=2, le=50)
    test_size: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 42
    cache: bool = True
    num_workers: int = Field(2, ge=0, le=64)
    augment: Literal["none", "light", "bus"] = "bus"

    @field_validator("dataset")
    @classmethod
    def _well_formed(cls, v: str | list[str]) -> str | list[str]:
        """Known keys are checked by :func:`validate` (they depend on plugins and on ``data_root``)."""
        keys = [v] if isinstance(v, str) else v
        if not keys:
            raise ValueError("needs at least one dataset key")
        for key in keys:
            if not _DATASET_KEY.match(key):
                raise ValueError(f"dataset key {key!r} must be lower-case letters, digits and '_'")
        return v

    @property
    def datasets(self) -> list[str]:
        return [self.dataset] if isinstance(self.dataset, str) else list(self.dataset)


class ModelConfig(_Section):
    name: str = "unet"
    params: dict[str, Any] = Field(default_factory=dict)
    pretrained: bool = False


class TaskConfig(_Section):
    mode: Literal["binary", "multiclass", "multitask"] = "binary"
    multitask_lambda: float = Field(0.5, ge=0.0, le=1.0)
    focal_gamma: float = Field(2.0, ge=0.0)
    cls_dropout: float = Field(0.5, ge=0.0, lt=1.0)
    oversample: bool = False
    refine: bool = True


class TrainConfig(_Section):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0.0, le=10.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    scheduler: Literal["cosine", "poly", "plateau", "none"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    min_lr: float = Field(1e-5, ge=0.0)
    loss: Literal["bce_dice", "bce", "dice", "focal", "lovasz", "tversky"] = "bce_dice"
    bce_weight: float = Field(0.5, ge=0.0, le=1.0)
    deep_supervision_weights: list[float] | None = None
    grad_clip: float | None = Field(None, gt=0.0)
    accumulate: int = Field(1, ge=1)
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    channels_last: bool = False
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    deterministic: bool = False
    val_every: int = Field(1, ge=1)
    early_stopping: int | None = Field(20, ge=1)
    strategy: Literal["standard", "adversarial_ds"] = "standard"
    adv_weight: float = Field(0.05, ge=0.0)
    adv_condition_on_image: bool = True
    adv_disc_width: int = Field(64, ge=1)
    init_from: str | None = None
    freeze_encoder: bool = False


class EvalConfig(_Section):
    resolution: Literal["network", "original"] = "network"
    hd95_mode: Literal["pooled", "max_directed"] = "pooled"
    tta: bool = False
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    batch_size: int = Field(16, ge=1)
    workers: int = Field(0, ge=0)


class OutputConfig(_Section):
    root: str = "results"
    tensorboard: bool = True
    tracker: Literal["tensorboard", "mlflow", "wandb"] = "tensorboard"
    overlays: int = Field(4, ge=0)


class Config(_Section):
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def hash(self) -> str:
        """Stable hash of everything that determines a run's results."""
        payload = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def run_dir(self, dataset: str | None = None) -> Path:
        """``<output.root>/<experiment>/<dataset>/<model>``; unions are named by joining keys with '+'."""
        name = dataset or "+".join(self.data.datasets)
        return Path(self.output.root) / self.experiment.name / name / self.model.name


# --------------------------------------------------------------------------------------------------------------
# Loading and composition


def read_mapping_file(
    path: str | os.PathLike,
    parse: Callable[[str, Path], Any],
    error: type[BusbenchError],
    *,
    missing: str,
    not_text: str,
    not_mapping: str,
) -> dict[str, Any]:
    """The mapping a UTF-8 text file holds (a YAML config, a JSON summary), or one ``error`` saying what is wrong.

    ``parse(text, path)`` turns the text into data and raises ``error`` itself for bad syntax. ``missing``,
    ``not_text`` and ``not_mapping`` are the messages for a file that is absent, not UTF-8, or holds something else
    than a mapping (``{kind}`` in ``not_mapping`` is replaced by the type found).
    """
    path = Path(path)
    if not path.is_file():
        raise error(missing)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(not_text) from None
    data = parse(text, path)
    if not isinstance(data, dict):
        raise error(not_mapping.format(kind=type(data).__name__))
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping with ``safe_load``; errors name the file."""
    path = Path(path)
    return read_mapping_file(
        path,
        _parse_yaml,
        ConfigError,
        missing=f"config file {path} does not exist; check the path (configs live under configs/)",
        not_text=f"{path} is not a UTF-8 text file; a config must be YAML text",
        not_mapping=f"{path} must hold a YAML mapping of sections (experiment:, data:, ...), got {{kind}}",
    )


def _parse_yaml(text: str, path: str | os.PathLike) -> Any:
    """``yaml.safe_load`` of a config's text ({} when empty), with one ConfigError naming ``path`` for bad YAML."""
    try:
        data = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:
        # a character YAML refuses (NUL, control characters: binary data or UTF-16 text); one line, not PyYAML's two
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise ConfigError(
            f"{path} is not YAML text: character {char} at position {exc.position} ({exc.reason}); "
            "a config must be YAML saved as UTF-8 text"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    return {} if data is None else data


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``; mappings merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"train.lr=3e-4"`` -> ``{"train": {"lr": 0.0003}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.lr=3e-4")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key; write it as section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "3e-4" as a string; numbers written that way are meant as floats.
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        value = float(value)
    node: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        node = {part: node}
    return node


def find_configs_dir(start: Path | None = None) -> Path | None:
    """The ``configs/`` folder: $BUSBENCH_CONFIGS, else the nearest ``configs/`` holding default.yaml above ``start``
    or the working directory."""
    env = os.environ.get("BUSBENCH_CONFIGS")
    if env:
        return Path(env)
    candidates = []
    if start is not None:
        start = start.resolve()
        candidates += [p for p in [start, *start.parents]]
    cwd = Path.cwd().resolve()
    candidates += [cwd, *cwd.parents]
    for folder in candidates:
        if folder.name == "configs" and (folder / "default.yaml").is_file():
            return folder
        if (folder / "configs" / "default.yaml").is_file():
            return folder / "configs"
    return None


def _get(d: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def compose(
    config_path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Merge default, dataset, model, experiment files and overrides into one plain mapping (unvalidated)."""
    exp_path = Path(config_path) if config_path else None
    configs_dir = find_configs_dir(exp_path.parent if exp_path else None)
    experiment = read_yaml(exp_path) if exp_path else {}
    override_dicts = [parse_override(o) for o in overrides or []]

    top: dict[str, Any] = {}
    if configs_dir and (configs_dir / "default.yaml").is_file():
        top = read_yaml(configs_dir / "default.yaml")
    partial = top
    for layer in [experiment, *override_dicts]:
        partial = deep_merge(partial, layer)
    dataset = _get(partial, "data.dataset")
    model = _get(partial, "model.name")
    layers: list[dict[str, Any]] = [top]
    if configs_dir:
        if isinstance(dataset, str) and (configs_dir / "datasets" / f"{dataset}.yaml").is_file():
            layers.append(read_yaml(configs_dir / "datasets" / f"{dataset}.yaml"))
        if isinstance(model, str) and (configs_dir / "models" / f"{model}.yaml").is_file():
            layers.append(read_yaml(configs_dir / "models" / f"{model}.yaml"))
    if _get(experiment, "model.name", model) != model and isinstance(experiment.get("model"), dict):
        # the model was swapped on the command line: the experiment's params belonged to its own model
        experiment = {**experiment, "model": {k: v for k, v in experiment["model"].items() if k != "params"}}
    merged: dict[str, Any] = {}
    for layer in [*layers, experiment, *override_dicts]:
        merged = deep_merge(merged, layer)
    return merged


def _unknown_keys(data: dict[str, Any], schema: type[BaseModel], prefix: str = "") -> list[str]:
    errors = []
    fields = schema.model_fields
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = (
                f"; did you mean '{prefix}{close[0]}'?"
                if close
                else f"; valid keys here: {', '.join(fields)}"
            )
            errors.append(f"unknown config key '{path}'{hint}")
            continue
        annotation = fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
            errors += _unknown_keys(value, annotation, prefix=f"{path}.")
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and value is not None:
            errors.append(
                f"config key '{path}' must be a mapping of {annotation.__name__} keys, got {value!r}"
            )
    return errors


def _describe(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def validate(data: dict[str, Any], source: str = "config", *, check_datasets: bool = True) -> Config:
    """Check a merged mapping against the schema; one ConfigError listing every problem by full key path.

    ``check_datasets`` also checks that each ``data.dataset`` key is known (:func:`known_dataset_keys`); a run's
    saved config is read without that check, so results stay readable where the data is not.
    """
    problems = _unknown_keys(data, Config)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            path = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            msgs.append(f"config key '{path}' {msg} (got {value!r})")
        raise ConfigError(f"{source}: " + "; ".join(msgs)) from None
    problems = dataset_conflicts(cfg) + method_conflicts(cfg)
    if check_datasets:
        problems = [
            f"config key 'data.dataset' {p}"
            for key in cfg.data.datasets
            if (p := dataset_key_problem(key, cfg.data.data_root))
        ] + problems
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return cfg


def dataset_conflicts(cfg: Config) -> list[str]:
    """A union of datasets that hold the same images is refused: each one's test split would hold the other's
    development images, and the validation folds would leak the same way."""
    keys = cfg.data.datasets
    shared = [k for k in keys if sum(IMAGE_FAMILIES.get(o, o) == IMAGE_FAMILIES.get(k, k) for o in keys) > 1]
    if not shared:
        return []
    return [
        f"data.dataset {'+'.join(keys)}: {' and '.join(shared)} share images (Curated BUSI is a subset of BUSI), "
        "so a union would test on images it trained on; train on one of them, e.g. data.dataset=curated_busi"
    ]


# losses with a multi-class counterpart (cross-entropy for BCE, multi-class soft Dice for Dice)
_MULTICLASS_LOSSES = ("bce_dice", "bce", "dice")


def method_conflicts(cfg: Config) -> list[str]:
    """Settings of ``task`` and ``train.strategy`` that cannot work together, each with its fix.

    Checks that need the model itself (a bottleneck for multitask, four deep-supervision outputs for
    adversarial_ds) are made when the model is built (:mod:`busbench.engine.tasks`).
    """
    t, problems = cfg.train, []
    if t.strategy == "adversarial_ds":
        if t.accumulate != 1:
            problems.append(
                f"train.strategy=adversarial_ds updates generator and discriminators on every batch, so "
                f"train.accumulate must be 1 (got {t.accumulate}); raise train.batch_size instead"
            )
        if cfg.task.mode != "binary":
            problems.append(
                f"train.strategy=adversarial_ds judges one-channel lesion masks, so task.mode must be binary "
                f"(got {cfg.task.mode})"
            )
    mask_threshold = cfg.model.params.get("mask_threshold", 0.5)
    if (
        cfg.model.name == "maskrcnn"
        and isinstance(mask_threshold, int | float)
        and cfg.eval.threshold < mask_threshold
    ):
        problems.append(
            f"model maskrcnn zeroes instance-mask probabilities below model.params.mask_threshold "
            f"({mask_threshold}), so eval.threshold={cfg.eval.threshold} would act as {mask_threshold}; set "
            f"eval.threshold >= {mask_threshold}, or train with model.params.mask_threshold={cfg.eval.threshold}"
        )
    if cfg.task.mode == "multiclass" and t.loss not in _MULTICLASS_LOSSES:
        problems.append(
            f"task.mode=multiclass trains with cross-entropy and/or Dice: train.loss must be one of "
            f"{', '.join(_MULTICLASS_LOSSES)} (got {t.loss})"
        )
    return problems


def load_config(config_path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Compose and validate a run configuration (see the module docstring for the order)."""
    source = str(config_path) if config_path else "config"
    return validate(compose(config_path, overrides), source=source)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the fully resolved configuration, atomically."""
    atomic_write_text(path, cfg.to_yaml())


def config_from_file(path: str | os.PathLike) -> Config:
    """Load an already resolved config (e.g. a run's config.yaml) without composing defaults.

    Its dataset keys are not looked up: the run's data may live on another machine.
    """
    return validate(read_yaml(path), source=str(path), check_datasets=False)


# --------------------------------------------------------------------------------------------------------------
# Dataset keys


def manifest_dir_of(data_root: str | os.PathLike | None = None) -> Path:
    """``<data root>/manifests``, the data root being ``data_root``, else ``$BUSBENCH_DATA``, else ``data``."""
    base = data_root if data_root is not None else os.environ.get(DATA_ENV) or DEFAULT_DATA_ROOT
    return Path(base) / "manifests"


def known_dataset_keys(data_root: str | os.PathLike | None = None) -> dict[str, str]:
    """Every dataset key a config may name, sorted, with where it comes from.

    ``busbench`` for the built-in datasets, ``plugin <module> (...)`` for adapters registered by plugins
    (:mod:`busbench.plugins`, imported here), and ``prepared`` for a manifest ``<key>.csv`` under the data
    root's ``manifests/`` folder (e.g. a ``--layout folder`` dataset).
    """
    plugins.load_plugins()
    keys = {key: plugins.BUILTIN_SOURCE for key in BUILTIN_DATASET_KEYS}
    for key, source in plugins.dataset_sources().items():
        keys.setdefault(key, source)
    folder = manifest_dir_of(data_root)
    if folder.is_dir():
        for path in folder.glob("*.csv"):
            if _DATASET_KEY.match(path.stem):
                keys.setdefault(path.stem, "prepared")
    return dict(sorted(keys.items()))


def dataset_key_problem(key: str, data_root: str | os.PathLike | None = None) -> str | None:
    """Why ``key`` names no dataset here (with a did-you-mean and how to prepare a new one), or None."""
    known = known_dataset_keys(data_root)
    if key in known:
        return None
    close = difflib.get_close_matches(str(key), list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (
        f"unknown dataset {key!r}{hint}; valid keys: {', '.join(known)} (built-in, plugin, or prepared under "
        f"{manifest_dir_of(data_root)}); a dataset of your own is prepared with busbench prepare --layout folder "
        "--key NAME --dataset-dir DIR"
    )
