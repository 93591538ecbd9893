"""Loading pretrained weights into a built network, kept apart from building it.

A *source* is either a local file (``.pt``, ``.pth``, ``.bin``, ``.ckpt`` read with
``torch.load(weights_only=True)``; ``.safetensors`` when the ``safetensors`` package is installed) or a library
tag: a timm model name such as ``swin_tiny_patch4_window7_224.ms_in1k``, or ``smp:<encoder>:<weights>`` such as
``smp:resnet34:imagenet`` for a segmentation_models_pytorch encoder. Tags are fetched through the library's own
pretrained mechanism, which needs internet; offline, download the file elsewhere and point to it.

Checkpoints rarely match the target exactly, so loading is lenient and reports what it did:

- containers (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped and ``module.`` / ``_orig_mod.`` prefixes
  (DataParallel, torch.compile) are stripped;
- a first convolution trained on RGB is fitted to grey input by **summing** its kernels over the three input
  channels. A grey image fed to an RGB network is usually the grey value repeated in R, G and B, and
  ``conv(W, [x, x, x]) == conv(W_R + W_G + W_B, x)``, so the summed kernel gives the 1-channel network exactly the
  activations the pretrained network had on that image (a mean would scale them by 1/3). The other way round
  (grey checkpoint, RGB model) repeats the kernel and divides by 3, which keeps the same property;
- absolute position embeddings (``*pos_embed``) are resampled to the target's patch grid (dropping a class token
  the target does not have), so ViT weights trained at 224 px load into a model built for another size;
- tensors whose shapes still differ are skipped and listed, as are missing and unexpected keys.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from busbench.errors import ModelError

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model_state", "model")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
NO_INTERNET = "no internet: download the weights and set model.params.weights to a local file path"


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did; lists hold state-dict keys of the target module."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the target, absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, absent from the target
    adapted: list[str] = field(default_factory=list)  # loaded after changing input channels or grid size
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint shape vs model shape", not loaded

    def summary(self) -> str:
        return (
            f"weights {self.source}: loaded {len(self.loaded)} tensors ({len(self.adapted)} adapted), "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} shape mismatches"
        )


def load_pretrained(
    model_or_module: nn.Module, source: str | Path, in_channels: int, strict: bool = False
) -> LoadReport:
    """Load ``source`` into ``model_or_module`` in place and report matches; see the module docstring.

    ``in_channels`` is the channel count the target takes (1 or 3); first-convolution kernels are adapted to it.
    Raises :class:`ModelError` if the source cannot be read or fetched, if no tensor matches, or, with
    ``strict=True``, if anything is missing, unexpected or mismatched.
    """
    source_text = str(source)
    checkpoint = read_state_dict(source)
    report = LoadReport(source_text)
    target = model_or_module.state_dict()
    new_values: dict[str, Tensor] = {}
    for key, value in checkpoint.items():
        if key not in target:
            report.unexpected.append(key)
            continue
        expected = target[key]
        if value.shape == expected.shape:
            new_values[key] = value
            continue
        fitted = _fit_input_channels(value, expected, in_channels)
        if fitted is None and key.endswith("pos_embed"):
            fitted = _resample_pos_embed(value, expected)
        if fitted is None:
            report.mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(expected.shape)}")
        else:
            new_values[key] = fitted
            report.adapted.append(key)
    report.loaded = sorted(new_values)
    report.missing = sorted(k for k in target if k not in checkpoint)
    report.unexpected.sort()
    report.adapted.sort()
    report.mismatched.sort()
    if not new_values:
        raise ModelError(
            f"weights {source_text} share no tensor names with {type(model_or_module).__name__} "
            f"(checkpoint keys start with {sorted(checkpoint)[:3]}, model keys with {sorted(target)[:3]}); "
            "point model.params.weights at a checkpoint of this architecture's encoder"
        )
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise ModelError(f"{report.summary()} (strict loading); use a checkpoint that matches exactly")
    with torch.no_grad():
        for key, value in new_values.items():
            target[key].copy_(value.to(dtype=target[key].dtype))
    if report.missing or report.unexpected or report.mismatched:
        log.warning(
            "%s; missing e.g. %s; unexpected e.g. %s; mismatched e.g. %s",
            report.summary(),
            report.missing[:3],
            report.unexpected[:3],
            report.mismatched[:3],
        )
    else:
        log.info(report.summary())
    return report


def read_state_dict(source: str | Path) -> dict[str, Tensor]:
    """The flat ``name -> tensor`` mapping held by a file or fetched for a library tag."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        return _normalise(_read_file(path), text)
    if path.suffix.lower() in FILE_SUFFIXES or "/" in text or "\\" in text:
        raise ModelError(f"weights file {text} does not exist; fix model.params.weights")
    return _normalise(_fetch_tag(text), text)


def _read_file(path: Path) -> object:
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ModelError(
                f"reading {path} needs the 'safetensors' package; pip install safetensors, or save the "
                "weights with torch.save"
            ) from exc
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelError(f"cannot read weights file {path}: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"weights file {path} holds Python objects besides tensors and is not loaded for safety; "
            "re-save only the tensors, e.g. torch.save(checkpoint['state_dict'], path)"
        ) from exc
    except Exception as exc:
        raise ModelError(
            f"cannot read weights file {path} ({type(exc).__name__}: {exc}); is it a torch checkpoint?"
        ) from exc


def _fetch_tag(tag: str) -> Mapping[str, Tensor]:
    """Fetch pretrained weights through timm or segmentation_models_pytorch."""
    if tag.startswith("smp:"):
        parts = tag.split(":")
        if len(parts) != 3 or not all(parts[1:]):
            raise ModelError(
                f"weights tag {tag!r} must look like smp:<encoder>:<weights>, e.g. smp:resnet34:imagenet"
            )
        import segmentation_models_pytorch as smp

        try:
            return smp.encoders.get_encoder(parts[1], in_channels=3, weights=parts[2]).state_dict()
        except (KeyError, ValueError) as exc:
            raise ModelError(f"smp knows no encoder weights {tag!r}: {exc}") from exc
        except Exception as exc:
            raise ModelError(f"cannot fetch weights {tag!r} ({type(exc).__name__}); {NO_INTERNET}") from exc
    import timm

    if not timm.is_model(tag):
        raise ModelError(
            f"weights {tag!r} is neither an existing file nor a timm model name; set model.params.weights to a "
            "checkpoint path, a timm tag such as swin_tiny_patch4_window7_224.ms_in1k, or smp:<encoder>:<weights>"
        )
    try:
        return timm.create_model(tag, pretrained=True).state_dict()
    except Exception as exc:  # the hub client raises many types (httpx, requests, OSError) when offline
        raise ModelError(f"cannot fetch weights {tag!r} ({type(exc).__name__}); {NO_INTERNET}") from exc


def _normalise(obj: object, source: str) -> dict[str, Tensor]:
    for _ in range(3):  # containers may nest, e.g. {"model": {"state_dict": ...}}
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ModelError(f"weights {source} hold a {type(obj).__name__}, not a state dict of tensors")
    tensors: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            continue
        name = str(key)
        for prefix in STRIPPED_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        tensors[name] = value
    if not tensors:
        raise ModelError(f"weights {source} contain no tensors")
    return tensors


def _fit_input_channels(value: Tensor, expected: Tensor, in_channels: int) -> Tensor | None:
    """Convolution kernel trained on 3 (or 1) input channels, fitted to ``in_channels``; None if not that case."""
    if value.ndim != 4 or expected.ndim != 4 or expected.shape[1] != in_channels:
        return None
    if value.shape[0] != expected.shape[0] or value.shape[2:] != expected.shape[2:]:
        return None
    if value.shape[1] == 3 and in_channels == 1:
        return value.sum(dim=1, keepdim=True)
    if value.shape[1] == 1 and in_channels == 3:
        return value.repeat(1, 3, 1, 1) / 3
    return None


def _resample_pos_embed(value: Tensor, expected: Tensor) -> Tensor | None:
    """Position embeddings ``(1, prefix + g*g, C)`` resampled to the target's prefix count and grid."""
    if value.ndim != 3 or expected.ndim != 3 or value.shape[0] != 1 or value.shape[2] != expected.shape[2]:
        return None
    split_src, split_dst = _square_split(value.shape[1]), _square_split(expected.shape[1])
    if split_src is None or split_dst is None:
        return None
    (prefix_src, grid_src), (prefix_dst, grid_dst) = split_src, split_dst
    if prefix_dst > prefix_src:
        return None
    from timm.layers import resample_abs_pos_embed

    resampled = resample_abs_pos_embed(
        value.float(),
        new_size=[grid_dst, grid_dst],
        old_size=[grid_src, grid_src],
        num_prefix_tokens=prefix_src,
    )
    grid_part = resampled[:, prefix_src:]
    return torch.cat([resampled[:, :prefix_dst], grid_part], dim=1)


def _square_split(tokens: int) -> tuple[int, int] | None:
    """(prefix tokens, grid side) for a token count made of at most 8 prefix tokens and a square grid."""
    for prefix in range(0, 9):
        side = math.isqrt(tokens - prefix) if tokens > prefix else 0
        if side > 0 and side * side == tokens - prefix:
            return prefix, side
    return None
