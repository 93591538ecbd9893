"""Pretrained-encoder models from segmentation_models_pytorch (smp).

Every smp architecture is registered as ``smp_<short name>`` (``smp_unet``, ``smp_unetpp``, ``smp_fpn``,
``smp_deeplabv3p``, ``smp_linknet``, ...), and ``smp`` builds any of them from ``arch=``:
``create_model("smp", arch="Linknet", encoder="resnet34")``. smp adapts the first convolution to 1 or 3 input
channels itself (summing or repeating pretrained RGB filters).

``encoder_weights`` is ``None`` (random init, the default), an smp tag such as ``"imagenet"`` (downloaded by smp
on first use), or a local weights file of the encoder (e.g. a torchvision ResNet checkpoint), which is loaded into
the encoder by :mod:`busbench.models.weights` (first convolution fitted to the input channels).

The wrapper keeps busbench's model conventions: ``encoder_modules()`` is the smp encoder, and ``bottleneck`` is an
identity module the deepest encoder feature passes through, so hooks on it see that feature for every encoder.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from busbench.errors import ModelError
from busbench.models.base import SegModel
from busbench.models.registry import register_model

# short busbench name -> (smp architecture key, paper, input sizes with the default resnet encoder)
SMP_ARCHS: dict[str, tuple[str, str, str]] = {
    "unet": ("unet", "Ronneberger et al., MICCAI 2015 (U-Net decoder)", "multiple of 32"),
    "unetpp": ("unetplusplus", "Zhou et al., DLMIA 2018 (UNet++ decoder)", "multiple of 32"),
    "fpn": ("fpn", "Kirillov et al., CVPR 2019 (panoptic FPN decoder)", "multiple of 32"),
    "deeplabv3p": ("deeplabv3plus", "Chen et al., ECCV 2018 (DeepLabV3+)", "multiple of 16"),
    "deeplabv3": ("deeplabv3", "Chen et al., arXiv 2017 (DeepLabV3)", "multiple of 8"),
    "linknet": ("linknet", "Chaurasia and Culurciello, VCIP 2017 (LinkNet)", "multiple of 32"),
    "manet": ("manet", "Fan et al., IEEE Access 2020 (MA-Net)", "multiple of 32"),
    "pspnet": ("pspnet", "Zhao et al., CVPR 2017 (PSPNet)", "multiple of 8"),
    "pan": ("pan", "Li et al., BMVC 2018 (Pyramid Attention Network)", "multiple of 16, at least 128"),
    "upernet": ("upernet", "Xiao et al., ECCV 2018 (UPerNet)", "multiple of 32"),
    "segformer": ("segformer", "Xie et al., NeurIPS 2021 (SegFormer decoder)", "multiple of 32"),
    "dpt": (
        "dpt",
        "Ranftl et al., ICCV 2021 (DPT; needs a timm ViT encoder 'tu-...')",
        "set by the ViT encoder",
    ),
}
# smp architectures whose pyramid pooling fails on smaller inputs
_MIN_SIZE = {"pan": 128}
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def _smp() -> ModuleType:
    """segmentation_models_pytorch, imported on first use: it imports timm and torchvision (seconds), and the model
    registry imports this module whichever model is built."""
    import segmentation_models_pytorch

    return segmentation_models_pytorch


def _installed_archs() -> dict[str, str]:
    """smp architecture key -> class name, for the installed smp version."""
    return {key: cls.__name__ for key, cls in _smp().MODEL_ARCHITECTURES_MAPPING.items()}


def resolve_arch(arch: str) -> str:
    """Map a user-given architecture (``Linknet``, ``linknet``, ``deeplabv3p``, ``UnetPlusPlus``) to smp's key."""
    installed = _installed_archs()
    key = str(arch).lower().replace("-", "").replace("_", "")
    if key in SMP_ARCHS:
        key = SMP_ARCHS[key][0]
    if key not in installed and key in {k for k, _, _ in SMP_ARCHS.values()}:
        raise ModelError(
            f"smp architecture {key!r} is not in the installed segmentation_models_pytorch "
            f"{_smp().__version__}; upgrade it (pip install -U segmentation-models-pytorch)"
        )
    if key not in installed:
        names = ", ".join(sorted(installed.values()))
        raise ModelError(
            f"unknown smp architecture {arch!r} in model.params.arch; valid architectures: {names}"
        )
    return key


def is_weights_file(value: str) -> bool:
    """Whether ``encoder_weights`` names a local file rather than an smp tag such as ``imagenet``."""
    return Path(value).suffix in _WEIGHT_SUFFIXES or "/" in value or "\\" in value or Path(value).is_file()


def split_encoder_weights(encoder_weights: str | None) -> tuple[str | None, str | None]:
    """``(smp tag, local file)`` from a ``model.params.encoder_weights`` value; at most one is set."""
    if encoder_weights is None:
        return None, None
    if not isinstance(encoder_weights, str) or not encoder_weights:
        raise ModelError(
            f"model.params.encoder_weights must be null, an smp tag such as 'imagenet' or a weights file path, "
            f"got {encoder_weights!r}"
        )
    if is_weights_file(encoder_weights):
        if not Path(encoder_weights).is_file():
            raise ModelError(
                f"encoder weights file {encoder_weights} (model.params.encoder_weights) does not exist; "
                "fix the path or set encoder_weights to null"
            )
        return None, encoder_weights
    return encoder_weights, None


def load_weights_file(encoder: nn.Module, path: str, in_channels: int) -> None:
    """Load a local encoder weights file into ``encoder`` through busbench's pretrained-weight loader."""
    try:
        weights = importlib.import_module("busbench.models.weights")
    except ModuleNotFoundError as exc:
        if exc.name != "busbench.models.weights":
            raise
        raise ModelError(
            f"cannot load {path} (model.params.encoder_weights): this busbench install has no weights loader; "
            "use an smp tag such as 'imagenet' or null"
        ) from exc
    weights.load_pretrained(encoder, path, in_channels)


def _encoder_error(encoder: str, exc: Exception) -> ModelError:
    names = _smp().encoders.get_encoder_names()
    if encoder not in names and not str(encoder).startswith("tu-"):
        close = difflib.get_close_matches(str(encoder), names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        return ModelError(
            f"unknown smp encoder {encoder!r} in model.params.encoder.{hint} "
            "List them with segmentation_models_pytorch.encoders.get_encoder_names()"
        )
    return ModelError(f"could not build smp encoder {encoder!r} (model.params.encoder): {exc}")


def _weights_error(encoder: str, tag: str, exc: Exception) -> ModelError:
    return ModelError(
        f"could not get {tag!r} weights for encoder {encoder!r} (model.params.encoder_weights): {exc}. "
        "Without internet access, give a local weights file path or set encoder_weights to null"
    )


def make_encoder(encoder: str, in_channels: int, encoder_weights: str | None, depth: int = 5) -> nn.Module:
    """An smp encoder returning ``depth + 1`` feature maps (the input first); smp tags are fetched by smp.

    A local weights file is not loaded here: the caller loads it into the finished model.
    """
    tag, _ = split_encoder_weights(encoder_weights)
    try:
        return _smp().encoders.get_encoder(encoder, in_channels=in_channels, depth=depth, weights=tag)
    except (KeyError, ValueError, TypeError) as exc:
        raise _encoder_error(encoder, exc) from exc
    except (OSError, RuntimeError) as exc:
        raise _weights_error(encoder, str(tag), exc) from exc


# set by the wrapper, or in conflict with busbench's conventions (logits out, one output)
_RESERVED = {
    "self",
    "encoder_name",
    "encoder_weights",
    "in_channels",
    "classes",
    "activation",
    "aux_params",
    "kwargs",
}


def _check_arch_kwargs(cls: type, encoder: str, arch_kwargs: dict[str, Any]) -> None:
    """Reject ``model.params`` keys the smp architecture does not declare (smp would ignore most silently)."""
    accepted = sorted(set(inspect.signature(cls.__init__).parameters) - _RESERVED)
    for key in arch_kwargs:
        if key in ("activation", "aux_params"):
            raise ModelError(
                f"model.params.{key} is not supported: busbench models return logits only "
                "(attach a classification head to model.bottleneck instead)"
            )
        # timm encoders ('tu-...') take their own keyword arguments through smp
        if key not in accepted and not str(encoder).startswith("tu-"):
            raise ModelError(
                f"smp {cls.__name__} has no option {key!r} (model.params.{key}); "
                f"valid options: encoder, encoder_weights, {', '.join(accepted)}"
            )


class FeatureTap(nn.Identity):
    """Identity the deepest encoder feature is routed through, so forward hooks on it can read that feature."""


class _RouteDeepest:
    """Encoder forward hook sending the last feature map through a :class:`FeatureTap` (picklable, copyable)."""

    def __init__(self, tap: FeatureTap) -> None:
        self.tap = tap

    def __call__(self, module: nn.Module, args: Any, features: list[Tensor]) -> list[Tensor]:
        return [*features[:-1], self.tap(features[-1])]


class SmpSegModel(SegModel):
    """An smp model with busbench's conventions; ``self.net`` is the smp model itself.

    Inputs must be multiples of the encoder's output stride (32 for a 5-stage encoder, less for the dilated
    encoders of DeepLabV3/V3+ and the shallow one of PSPNet).
    """

    def __init__(
        self,
        arch: str,
        in_channels: int = 1,
        num_classes: int = 1,
        encoder: str = "resnet34",
        encoder_weights: str | None = None,
        **arch_kwargs: Any,
    ) -> None:
        super().__init__()
        self.arch = resolve_arch(arch)
        cls = _smp().MODEL_ARCHITECTURES_MAPPING[self.arch]
        _check_arch_kwargs(cls, encoder, arch_kwargs)
        tag, weights_file = split_encoder_weights(encoder_weights)
        try:
            self.net = cls(
                encoder_name=encoder,
                encoder_weights=tag,
                in_channels=in_channels,
                classes=num_classes,
                **arch_kwargs,
            )
        except TypeError as exc:
            raise ModelError(
                f"smp {cls.__name__} does not accept these model.params ({exc}); remove or rename them"
            ) from exc
        except (KeyError, ValueError, AssertionError) as exc:
            raise _encoder_error(encoder, exc) from exc
        except (OSError, RuntimeError) as exc:
            raise _weights_error(encoder, str(tag), exc) from exc
        self.size_multiple = int(getattr(self.net.encoder, "output_stride", 32))
        self.min_size = _MIN_SIZE.get(self.arch, 0)
        self.bottleneck = FeatureTap()
        self.bottleneck_channels = int(self.net.encoder.out_channels[-1])
        self.net.encoder.register_forward_hook(_RouteDeepest(self.bottleneck))
        if weights_file is not None:
            load_weights_file(self.net.encoder, weights_file, in_channels)

    def check_input_size(self, h: int, w: int) -> None:
        super().check_input_size(h, w)
        if min(h, w) < self.min_size:
            raise ModelError(
                f"smp {type(self.net).__name__} needs inputs of at least {self.min_size}x{self.min_size}, "
                f"got {h}x{w}; raise data.image_size"
            )

    def encoder_modules(self) -> list[nn.Module]:
        return [self.net.encoder]

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return self.net(x)


def _arch_builder(short: str):
    arch_key = SMP_ARCHS[short][0]

    def build(
        in_channels: int,
        num_classes: int,
        image_size: int,
        *,
        encoder: str = "resnet34",
        encoder_weights: str | None = None,
        **arch_kwargs: Any,
    ) -> SmpSegModel:
        return SmpSegModel(arch_key, in_channels, num_classes, encoder, encoder_weights, **arch_kwargs)

    build.__name__ = f"build_smp_{short}"
    build.__doc__ = f"smp architecture {arch_key!r} with an smp encoder (default resnet34, random init)."
    return build


# Registered without importing smp (see _smp); an architecture the installed smp lacks fails when it is built.
for _short, (_key, _paper, _sizes) in SMP_ARCHS.items():
    register_model(f"smp_{_short}", paper=_paper, input_sizes=_sizes, pretrained=True)(_arch_builder(_short))


@register_model(
    "smp",
    paper="any segmentation_models_pytorch architecture, chosen by model.params.arch",
    input_sizes="the encoder's output stride (32 for most)",
    pretrained=True,
)
def build_smp(
    in_channels: int,
    num_classes: int,
    image_size: int,
    *,
    arch: str | None = None,
    encoder: str = "resnet34",
    encoder_weights: str | None = None,
    **arch_kwargs: Any,
) -> SmpSegModel:
    """Any smp architecture by name, e.g. ``arch="Linknet"``; same keywords as the ``smp_*`` models."""
    if arch is None:
        names = ", ".join(sorted(_installed_archs().values()))
        raise ModelError(f"model 'smp' needs model.params.arch; valid architectures: {names}")
    return SmpSegModel(arch, in_channels, num_classes, encoder, encoder_weights, **arch_kwargs)
