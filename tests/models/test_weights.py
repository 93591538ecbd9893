"""Pretrained-weight loading: files, containers, channel adaptation, position embeddings, reports and errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from busbench.errors import ModelError
from busbench.models import create_model
from busbench.models.weights import load_pretrained, read_state_dict

torch.set_num_threads(2)

MEDT_TINY = {"image_size": 32, "width": 4, "heads": 2}
FIRST = "stem.0.0.weight"


def tiny_medt(in_channels: int, seed: int):
    torch.manual_seed(seed)
    return create_model("medt", in_channels=in_channels, **MEDT_TINY).eval()


def test_rgb_checkpoint_into_grey_model_sums_first_kernels(tmp_path: Path) -> None:
    rgb = tiny_medt(3, seed=1)
    path = tmp_path / "rgb.pt"
    torch.save(rgb.state_dict(), path)
    grey = tiny_medt(1, seed=2)
    report = load_pretrained(grey, path, in_channels=1)
    torch.testing.assert_close(grey.state_dict()[FIRST], rgb.state_dict()[FIRST].sum(dim=1, keepdim=True))
    assert report.adapted == [FIRST]
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert len(report.loaded) == len(rgb.state_dict())
    # the grey network now sees a grey image exactly as the RGB network sees it repeated in R, G and B
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)


def test_grey_checkpoint_into_rgb_model_repeats_a_third(tmp_path: Path) -> None:
    grey = tiny_medt(1, seed=3)
    path = tmp_path / "grey.pth"
    torch.save(grey.state_dict(), path)
    rgb = tiny_medt(3, seed=4)
    report = load_pretrained(rgb, path, in_channels=3)
    assert report.adapted == [FIRST]
    torch.testing.assert_close(rgb.state_dict()[FIRST], grey.state_dict()[FIRST].repeat(1, 3, 1, 1) / 3)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rgb(x.repeat(1, 3, 1, 1)), grey(x), atol=1e-4, rtol=1e-4)


def test_partial_checkpoint_reports_missing_and_unexpected(tmp_path: Path, caplog) -> None:
    source = tiny_medt(1, seed=5).state_dict()
    dropped = sorted(k for k in source if k.startswith("head."))
    partial = {k: v for k, v in source.items() if k not in dropped}
    partial["decoder.extra.weight"] = torch.ones(3)
    partial["stem.0.1.weight"] = torch.ones(7)  # a BatchNorm weight of the wrong size
    path = tmp_path / "partial.pt"
    torch.save(partial, path)
    target = tiny_medt(1, seed=6)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="busbench.models.weights"):
        report = load_pretrained(target, path, in_channels=1)
    assert report.missing == dropped
    assert report.unexpected == ["decoder.extra.weight"]
    assert report.mismatched == ["stem.0.1.weight: (7,) vs (4,)"]
    after = target.state_dict()
    assert torch.equal(after["stem.0.1.weight"], before["stem.0.1.weight"])  # mismatch left untouched
    assert all(torch.equal(after[k], before[k]) for k in dropped)
    assert torch.equal(after["stem.0.0.weight"], source["stem.0.0.weight"])
    assert "2 missing, 1 unexpected, 1 shape mismatches" in caplog.text
    with pytest.raises(ModelError, match="strict"):
        load_pretrained(tiny_medt(1, seed=6), path, in_channels=1, strict=True)


def test_containers_and_wrapper_prefixes_are_unwrapped(tmp_path: Path) -> None:
    source = tiny_medt(1, seed=7).state_dict()
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.items()}}
    path = tmp_path / "checkpoint.ckpt"
    torch.save({"model": wrapped}, path)
    loaded = read_state_dict(path)
    assert sorted(loaded) == sorted(source)
    target = tiny_medt(1, seed=8)
    report = load_pretrained(target, path, in_channels=1)
    assert report.missing == [] and report.unexpected == []
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.items())


def test_safetensors_file(tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source = tiny_medt(1, seed=9).state_dict()
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    target = tiny_medt(1, seed=10)
    assert load_pretrained(target, path, in_channels=1).missing == []
    assert torch.equal(target.state_dict()[FIRST], source[FIRST])


def test_nothing_matching_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.ones(2, 2)}, path)
    with pytest.raises(ModelError, match="share no tensor names"):
        load_pretrained(tiny_medt(1, seed=0), path, in_channels=1)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": tiny_medt(1, seed=0).state_dict(), "args": Path("x")}, path)
    with pytest.raises(ModelError, match="Python objects besides tensors"):
        read_state_dict(path)


def test_missing_file_and_unknown_tag(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    with pytest.raises(ModelError, match="neither an existing file nor a timm model"):
        read_state_dict("not_a_model_name_xyz")
    with pytest.raises(ModelError, match="smp:<encoder>:<weights>"):
        read_state_dict("smp:resnet34")


def test_library_tag_offline_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import segmentation_models_pytorch as smp
    import timm

    def offline(*_args, **_kwargs):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(smp.encoders, "get_encoder", offline)
    for tag in ("swin_tiny_patch4_window7_224.ms_in1k", "smp:resnet34:imagenet"):
        with pytest.raises(
            ModelError, match="no internet: download the weights and set model.params.weights"
        ):
            read_state_dict(tag)


def test_swinunet_builder_loads_encoder_weights(tmp_path: Path) -> None:
    tiny = {
        "embed_dim": 12,
        "encoder_depths": (1, 1, 1, 1),
        "decoder_depths": (1, 1, 1),
        "num_heads": (1, 1, 2, 2),
    }
    torch.manual_seed(0)
    rgb = create_model("swinunet", in_channels=3, image_size=64, **tiny)
    path = tmp_path / "swin_encoder.pt"
    torch.save(rgb.encoder.state_dict(), path)
    torch.manual_seed(1)
    grey = create_model("swinunet", in_channels=1, image_size=64, weights=str(path), **tiny)
    expected = rgb.encoder.patch_embed.proj.weight.sum(dim=1, keepdim=True)
    torch.testing.assert_close(grey.encoder.patch_embed.proj.weight, expected)
    torch.testing.assert_close(
        grey.encoder.layers[2].blocks[0].mlp.fc1.weight, rgb.encoder.layers[2].blocks[0].mlp.fc1.weight
    )


def test_transunet_position_embeddings_follow_the_image_size(tmp_path: Path) -> None:
    tiny = {"vit_depth": 1, "decoder_channels": (8, 8, 8, 4)}
    torch.manual_seed(0)
    source = create_model("transunet", in_channels=3, image_size=32, **tiny)  # 2 x 2 patch grid
    state = source.encoder.state_dict()
    grid = torch.arange(4, dtype=torch.float32).reshape(1, 4, 1).expand(1, 4, state["pos_embed"].shape[-1])
    # a checkpoint with a class token, as timm's ImageNet ViTs have: the token is dropped, the grid resampled
    state["pos_embed"] = torch.cat([torch.full_like(grid[:, :1], 99.0), grid], dim=1)
    path = tmp_path / "vit.pt"
    torch.save(state, path)
    torch.manual_seed(1)
    target = create_model("transunet", in_channels=1, image_size=64, **tiny)  # 4 x 4 patch grid
    report = load_pretrained(target.encoder, path, in_channels=1)
    assert report.adapted == ["patch_embed.backbone.stem.conv.weight", "pos_embed"]  # sorted
    pos = target.encoder.pos_embed.detach()[0, :, 0].reshape(4, 4)
    assert pos.shape == (4, 4) and (pos != 99.0).all()
    # interpolating the ramp [[0, 1], [2, 3]] (row step 2, column step 1) stays separable: every row has the same
    # column profile, and moving down a row adds twice what moving right a column adds
    assert pos[0, 0] < pos[0, 3] < pos[3, 0] < pos[3, 3]
    torch.testing.assert_close(pos - pos[:, :1], (pos[0] - pos[0, 0]).expand(4, 4))
    torch.testing.assert_close(pos[:, 0] - pos[0, 0], 2 * (pos[0] - pos[0, 0]))


# ---------------------------------------------------------------------------------------- published weights

REPO = Path(__file__).resolve().parents[2]
SWIN_TAG = "swin_tiny_patch4_window7_224.ms_in1k"
VIT_TAG = "vit_base_r50_s16_224.orig_in21k"
# a narrow Swin-T: timm's key layout and depths (2, 2, 6, 2), 12 channels instead of 96
SWIN_SMALL = {"embed_dim": 12, "num_heads": (1, 1, 2, 2)}


def _no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to fetch a tag fails as it does offline (the tests never touch the network)."""
    import timm

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("[Errno 101] Network is unreachable")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)


def _timm_state(tag: str, **kwargs) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    return timm.create_model(tag, pretrained=False, **kwargs).state_dict()


def test_swin_checkpoint_with_timm_layout_loads_every_tensor(tmp_path: Path, monkeypatch) -> None:
    """A Swin-T state dict saved where busbench looks for it: every encoder tensor loaded, only the head unused."""
    from busbench.models.swinunet import IGNORED
    from busbench.models.weights import load_published

    _no_download(monkeypatch)
    monkeypatch.setenv("BUSBENCH_WEIGHTS", str(tmp_path))
    state = _timm_state(SWIN_TAG, **SWIN_SMALL)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / f"{SWIN_TAG}.safetensors"))
    full = {**SWIN_SMALL, "encoder_depths": (2, 2, 6, 2), "decoder_depths": (1, 1, 1)}

    torch.manual_seed(1)
    model = create_model("swinunet", in_channels=3, image_size=64, **full)
    report = load_published("swinunet", model.encoder, in_channels=3, ignore=IGNORED)
    target = model.encoder.state_dict()
    assert report.loaded == sorted(target)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.ignored == ["head.fc.bias", "head.fc.weight"]
    assert set(report.loaded) | set(report.ignored) == set(state)
    # at 64 px the 4x4 and 2x2 stages get smaller windows: their relative position tables are resampled
    assert report.adapted == sorted(k for k in target if target[k].shape != state[k].shape)
    assert report.adapted and all(k.startswith(("layers.2.", "layers.3.")) for k in report.adapted)
    assert all(k.endswith("relative_position_bias_table") for k in report.adapted)
    assert all(torch.equal(target[k], state[k]) for k in target if k not in report.adapted)

    # through the builder, grey input: the same tensors, the patch embedding summed over R, G and B
    torch.manual_seed(2)
    grey = create_model("swinunet", in_channels=1, image_size=64, weights="pretrained", **full).encoder.state_dict()
    first = "patch_embed.proj.weight"
    torch.testing.assert_close(grey[first], state[first].sum(dim=1, keepdim=True))
    assert all(torch.equal(grey[k], target[k]) for k in grey if k != first)

    # Swin-Unet's default encoder has 2 blocks in stage 3: the checkpoint's other four are reported, not loaded
    torch.manual_seed(3)
    default = create_model("swinunet", in_channels=3, image_size=64, **{**full, "encoder_depths": (2, 2, 2, 2)})
    report = load_published("swinunet", default.encoder, in_channels=3, ignore=IGNORED)
    assert report.missing == [] and report.mismatched == []
    assert {k.split(".")[:4][3] for k in report.unexpected} == {"2", "3", "4", "5"}
    assert all(k.startswith("layers.2.blocks.") for k in report.unexpected)


@pytest.mark.slow
def test_transunet_checkpoint_with_timm_layout_loads_every_tensor(tmp_path: Path, monkeypatch) -> None:
    """R50+ViT-B/16 in timm's layout (one transformer layer to keep the file small): every encoder tensor loaded,
    the position embeddings resampled from 14x14 to 2x2 without the class token, which is the only key unused."""
    from busbench.models.transunet import IGNORED
    from busbench.models.weights import load_published

    _no_download(monkeypatch)
    monkeypatch.setenv("BUSBENCH_WEIGHTS", str(tmp_path))
    state = _timm_state(VIT_TAG, depth=1)
    torch.save(state, tmp_path / f"{VIT_TAG}.pth")
    tiny = {"vit_depth": 1, "decoder_channels": (8, 8, 8, 4)}
    torch.manual_seed(1)
    model = create_model("transunet", in_channels=1, image_size=32, **tiny)
    report = load_published("transunet", model.encoder, in_channels=1, ignore=IGNORED)
    target = model.encoder.state_dict()
    assert report.loaded == sorted(target)
    assert report.adapted == ["patch_embed.backbone.stem.conv.weight", "pos_embed"]
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.ignored == ["cls_token"]
    assert set(report.loaded) | set(report.ignored) == set(state)
    assert all(torch.equal(target[k], state[k]) for k in target if k not in report.adapted)
    assert target["pos_embed"].shape == (1, 4, 768) and state["pos_embed"].shape == (1, 197, 768)


def test_benchmark_vit_config_loads_published_weights_from_the_local_file(tmp_path: Path, monkeypatch) -> None:
    """configs/experiments/benchmark_vit.yaml, swept to swinunet as run_vit.sh does, builds from the local file."""
    from busbench.config import load_config
    from busbench.engine.tasks import build_model

    _no_download(monkeypatch)
    monkeypatch.setenv("BUSBENCH_WEIGHTS", str(tmp_path))
    state = _timm_state(SWIN_TAG, **SWIN_SMALL)
    torch.save(state, tmp_path / f"{SWIN_TAG}.pth")
    small = [
        "model.name=swinunet",
        "data.image_size=64",
        "model.params.embed_dim=12",
        "model.params.num_heads=[1, 1, 2, 2]",
        "model.params.encoder_depths=[2, 2, 6, 2]",
    ]
    cfg = load_config(REPO / "configs" / "experiments" / "benchmark_vit.yaml", small)
    assert cfg.model.pretrained and cfg.model.params["weights"] is None
    encoder = build_model(cfg).encoder.state_dict()
    first = "patch_embed.proj.weight"
    torch.testing.assert_close(encoder[first], state[first].sum(dim=1, keepdim=True))  # data.channels: 1
    same = [k for k in encoder if k != first and encoder[k].shape == state[k].shape]
    assert len(same) > 150 and all(torch.equal(encoder[k], state[k]) for k in same)

    scratch = load_config(REPO / "configs" / "experiments" / "benchmark_vit_from_scratch.yaml", small)
    assert not scratch.model.pretrained
    torch.manual_seed(0)
    random = build_model(scratch).encoder.state_dict()
    assert not torch.equal(random["layers.0.blocks.0.mlp.fc1.weight"], state["layers.0.blocks.0.mlp.fc1.weight"])


def test_offline_without_the_file_names_the_file_and_where_to_put_it(tmp_path: Path, monkeypatch) -> None:
    _no_download(monkeypatch)
    monkeypatch.setenv("BUSBENCH_WEIGHTS", str(tmp_path / "weights"))
    with pytest.raises(ModelError) as err:
        create_model("swinunet", image_size=64, weights="pretrained", **SWIN_SMALL)
    message = str(err.value)
    target = (tmp_path / "weights" / f"{SWIN_TAG}.safetensors").resolve()
    assert f"save it as {target}" in message
    assert f"https://huggingface.co/timm/{SWIN_TAG}/resolve/main/model.safetensors" in message
    assert "BUSBENCH_WEIGHTS" in message and "benchmark_vit_from_scratch.yaml" in message
    assert "model.pretrained=false" in message
    assert not (tmp_path / "weights").exists()


def test_model_pretrained_switch_per_model() -> None:
    from busbench.models.weights import builder_params

    assert builder_params("transunet", {"vit_depth": 1}, True) == {"vit_depth": 1, "weights": "pretrained"}
    assert builder_params("swinunet", {"weights": None}, True) == {"weights": "pretrained"}
    assert builder_params("swinunet", {"weights": "my.pth"}, True) == {"weights": "my.pth"}  # explicit file wins
    assert builder_params("transunet", {}, False) == {}
    assert builder_params("medt", {"width": 4}, True) == {"width": 4}  # trained from scratch in its paper
    with pytest.raises(ModelError, match="model.params.encoder_weights"):
        builder_params("smp_unet", {}, True)
