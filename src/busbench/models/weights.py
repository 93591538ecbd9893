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
  the target does not have), so ViT weights trained at 224 px load into a model built for another size; Swin
  relative position bias tables are resampled to the target's window in the same way;
- tensors whose shapes still differ are skipped and listed, as are missing and unexpected keys;
- keys the caller names as not part of the target (a classifier head, a class token) are set aside as *ignored*
  rather than reported as unexpected.

``weights: pretrained`` in a builder means the weights the model's paper initialises its encoder with, named by a
timm tag (:data:`PUBLISHED`). :func:`load_published` reads them from ``<weights folder>/<tag>.safetensors`` (or
``.pth`` / ``.pt`` / ``.bin``) when that file exists, where the weights folder is ``$BUSBENCH_WEIGHTS`` or
``./weights``, and otherwise fetches the tag through timm. Offline without the file, the error names the URL to fetch
and the exact path to save it as.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import warnings
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
PRETRAINED = "pretrained"  # model.params.weights value meaning the model's published weights
WEIGHTS_ENV = "BUSBENCH_WEIGHTS"
DEFAULT_WEIGHTS_DIR = "weights"
LOCAL_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# model -> (timm tag of the encoder weights its paper starts from, what they are)
PUBLISHED: dict[str, tuple[str, str]] = {
    "transunet": ("vit_base_r50_s16_224.orig_in21k", "R50+ViT-B/16 trained on ImageNet-21k"),
    "swinunet": ("swin_tiny_patch4_window7_224.ms_in1k", "Swin-T trained on ImageNet-1k"),
}


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did; lists hold state-dict keys of the target module."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the target, absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, absent from the target
    adapted: list[str] = field(default_factory=list)  # loaded after changing input channels or grid size
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint shape vs model shape", not loaded
    ignored: list[str] = field(default_factory=list)  # checkpoint keys the caller declared as not in the target

    def summary(self) -> str:
        return (
            f"weights {self.source}: loaded {len(self.loaded)} tensors ({len(self.adapted)} adapted), "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} shape mismatches"
            + (f", {len(self.ignored)} ignored" if self.ignored else "")
        )


def load_pretrained(
    model_or_module: nn.Module,
    source: str | Path,
    in_channels: int,
    strict: bool = False,
    ignore: tuple[str, ...] = (),
) -> LoadReport:
    """Load ``source`` into ``model_or_module`` in place and report matches; see the module docstring.

    ``in_channels`` is the channel count the target takes (1 or 3); first-convolution kernels are adapted to it.
    Checkpoint keys starting with a prefix in ``ignore`` that the target lacks are listed as ignored.
    Raises :class:`ModelError` if the source cannot be read or fetched, if no tensor matches, or, with
    ``strict=True``, if anything is missing, unexpected or mismatched.
    """
    return _load_state(model_or_module, read_state_dict(source), str(source), in_channels, strict, ignore)


def _load_state(
    model_or_module: nn.Module,
    checkpoint: Mapping[str, Tensor],
    source_text: str,
    in_channels: int,
    strict: bool,
    ignore: tuple[str, ...],
) -> LoadReport:
    report = LoadReport(source_text)
    target = model_or_module.state_dict()
    new_values: dict[str, Tensor] = {}
    for key, value in checkpoint.items():
        if key not in target:
            (report.ignored if key.startswith(ignore) else report.unexpected).append(key)
            continue
        expected = target[key]
        if value.shape == expected.shape:
            new_values[key] = value
            continue
        fitted = _fit_input_channels(value, expected, in_channels)
        if fitted is None and key.endswith("pos_embed"):
            fitted = _resample_pos_embed(value, expected)
        if fitted is None and key.endswith("relative_position_bias_table"):
            fitted = _resample_rel_pos_bias(value, expected)
        if fitted is None:
            report.mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(expected.shape)}")
        else:
            new_values[key] = fitted
            report.adapted.append(key)
    report.loaded = sorted(new_values)
    report.missing = sorted(k for k in target if k not in checkpoint)
    report.unexpected.sort()
    report.ignored.sort()
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


def weights_dir() -> Path:
    """The folder searched for published weights: ``$BUSBENCH_WEIGHTS``, else ``./weights``."""
    return Path(os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS_DIR).expanduser()


def local_published_file(tag: str) -> Path | None:
    """``<weights folder>/<tag><suffix>`` for the first suffix in :data:`LOCAL_SUFFIXES` that exists, else None."""
    folder = weights_dir()
    return next((folder / f"{tag}{s}" for s in LOCAL_SUFFIXES if (folder / f"{tag}{s}").is_file()), None)


def download_url(tag: str) -> str:
    """Where a timm tag's weights can be downloaded by hand (its Hugging Face file, else timm's own URL)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(tag)
    if cfg is not None and cfg.hf_hub_id:
        return f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{cfg.hf_hub_filename or 'model.safetensors'}"
    if cfg is not None and cfg.url:
        return str(cfg.url)
    return f"https://huggingface.co/timm/{tag}"


def load_published(
    model_name: str, module: nn.Module, in_channels: int, ignore: tuple[str, ...] = ()
) -> LoadReport:
    """Load the encoder weights ``model_name``'s paper starts from (:data:`PUBLISHED`) into ``module``.

    A local file in :func:`weights_dir` wins over fetching the tag; offline without it, a :class:`ModelError`
    names the file to fetch and the path to save it as.
    """
    tag, what = PUBLISHED[model_name]
    local = local_published_file(tag)
    if local is not None:
        return load_pretrained(module, local, in_channels, ignore=ignore)
    try:
        checkpoint = _normalise(_fetch_tag(tag), tag)
    except ModelError as exc:
        target = (weights_dir() / f"{tag}.safetensors").resolve()
        reason = type(exc.__cause__).__name__ if exc.__cause__ is not None else str(exc)
        raise ModelError(
            f"{model_name}: pretrained weights ({what}, {tag}) are neither in {target.parent} nor downloadable "
            f"here ({reason}). Fetch {download_url(tag)} and save it as {target} (or set {WEIGHTS_ENV} to the "
            "folder holding it); to train from scratch instead, set model.pretrained=false and "
            "model.params.weights=null (configs/experiments/benchmark_vit_from_scratch.yaml)"
        ) from None
    return _load_state(module, checkpoint, tag, in_channels, False, ignore)


def builder_params(model_name: str, params: Mapping[str, object], pretrained: bool) -> dict[str, object]:
    """``model.params`` for building ``model_name``; with ``model.pretrained`` on, ``weights: pretrained`` is added
    for models with published weights (:data:`PUBLISHED`) unless ``model.params.weights`` already names some.

    Models that load other pretrained encoders through their own options (the smp family) are refused, so that
    ``model.pretrained`` never leaves a network silently random; the others are built as their params say.
    """
    params = dict(params)
    if not pretrained:
        return params
    if model_name in PUBLISHED:
        if params.get("weights") is None:
            params["weights"] = PRETRAINED
        return params
    from busbench.models.registry import get_spec

    if get_spec(model_name).pretrained:
        raise ModelError(
            f"model.pretrained=true: busbench has no published weights for {model_name}; set its pretrained "
            "encoder in model.params (e.g. model.params.encoder_weights) and model.pretrained=false"
        )
    log.info("model.pretrained: %s has no pretrained weights in busbench and is built from scratch", model_name)
    return params


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
    if (value.shape[1], in_channels) not in ((3, 1), (1, 3)):
        return None
    from timm.models import adapt_input_conv  # imported here: timm's model zoo takes seconds to import

    # timm sums RGB kernels for a grey input and repeats a grey kernel scaled by 1/3 for an RGB input
    return adapt_input_conv(in_channels, value, base_chans=value.shape[1])


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


def _resample_rel_pos_bias(value: Tensor, expected: Tensor) -> Tensor | None:
    """Swin relative position bias ``((2w-1)^2, heads)`` resampled to the target's window (timm shrinks the window
    of stages smaller than it, e.g. at input sizes below 224)."""
    if value.ndim != 2 or expected.ndim != 2 or value.shape[1] != expected.shape[1]:
        return None
    side = math.isqrt(expected.shape[0])
    if side * side != expected.shape[0] or side % 2 == 0 or math.isqrt(value.shape[0]) ** 2 != value.shape[0]:
        return None
    from timm.layers import resize_rel_pos_bias_table

    window = (side + 1) // 2
    with warnings.catch_warnings():  # timm's interpolation warns about its own indexing
        warnings.simplefilter("ignore", UserWarning)
        return resize_rel_pos_bias_table(value.float(), (window, window), tuple(expected.shape))


def _square_split(tokens: int) -> tuple[int, int] | None:
    """(prefix tokens, grid side) for a token count made of at most 8 prefix tokens and a square grid."""
    for prefix in range(0, 9):
        side = math.isqrt(tokens - prefix) if tokens > prefix else 0
        if side > 0 and side * side == tokens - prefix:
            return prefix, side
    return None
