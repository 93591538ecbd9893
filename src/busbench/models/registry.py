"""Model registry: one name -> builder mapping, one entry point.

Each model family module registers its builders with :func:`register_model`. :func:`create_model` is the only
way the rest of busbench builds a network, so every model is constructed, checked and counted the same way.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from busbench import plugins
from busbench.errors import ModelError

# Family modules imported on first use, so that registering a model is adding a module to this list.
FAMILY_MODULES = (
    "busbench.models.unet",
    "busbench.models.unetpp",
    "busbench.models.unet3p",
    "busbench.models.unext",
    "busbench.models.ukan",
    "busbench.models.cmunet",
    "busbench.models.transunet",
    "busbench.models.medt",
    "busbench.models.swinunet",
    "busbench.models.smp_family",
    "busbench.models.skunet",
    "busbench.models.maskrcnn",
    "busbench.models.unet_ds",
)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    paper: str
    input_sizes: str  # human-readable rule, e.g. "multiple of 16" or "224 only"
    pretrained: bool  # whether pretrained weights can be loaded
    source: str = plugins.BUILTIN_SOURCE  # "busbench" or "plugin <module> (<where it was declared>)"


_REGISTRY: dict[str, ModelSpec] = {}
_loaded = False


def register_model(name: str, *, paper: str, input_sizes: str, pretrained: bool = False):
    """Decorator registering ``builder(in_channels, num_classes, image_size, **kwargs) -> nn.Module``.

    Plugin modules (:mod:`busbench.plugins`) use it the same way; the spec records where the builder comes from.
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        source = plugins.source_of(builder.__module__)
        if name in _REGISTRY and _REGISTRY[name].builder is not builder:
            raise ModelError(
                f"model {name!r} from {source} is already registered by {_REGISTRY[name].source}; register it "
                "under another name"
            )
        _REGISTRY[name] = ModelSpec(name, builder, paper, input_sizes, pretrained, source)
        return builder

    return decorate


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    for module in FAMILY_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    plugins.load_plugins()
    _loaded = True


def model_specs() -> dict[str, ModelSpec]:
    _load_families()
    return dict(sorted(_REGISTRY.items()))


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return [n for n in model_specs() if fnmatch.fnmatch(n, pattern)]


def get_spec(name: str) -> ModelSpec:
    specs = model_specs()
    if name not in specs:
        close = difflib.get_close_matches(name, list(specs), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ModelError(f"unknown model {name!r}.{hint} Valid models: {', '.join(specs)}")
    return specs[name]


def create_model(
    name: str, in_channels: int = 1, num_classes: int = 1, image_size: int = 224, **kwargs
) -> nn.Module:
    """Build a registered model. Raises ModelError for unknown names or unsupported settings."""
    if in_channels not in (1, 3):
        raise ModelError(f"in_channels={in_channels} is not supported; use 1 (grey) or 3 (RGB)")
    if num_classes < 1:
        raise ModelError(f"num_classes={num_classes} must be >= 1")
    spec = get_spec(name)
    _check_kwargs(spec, kwargs)
    model = spec.builder(in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs)
    if hasattr(model, "check_input_size"):
        model.check_input_size(image_size, image_size)
    return model


def _check_kwargs(spec: ModelSpec, kwargs: dict) -> None:
    """Refuse misspelled builder options (config ``model.params``) before they turn into a TypeError."""
    params = inspect.signature(spec.builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n in params if n not in ("in_channels", "num_classes", "image_size")]
    for key in kwargs:
        if key not in params or key in ("in_channels", "num_classes", "image_size"):
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ModelError(
                f"model.params.{key} is not an option of {spec.name}.{hint} "
                f"Accepted: {', '.join(accepted) or 'none'}"
            )
