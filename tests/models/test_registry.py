"""The model registry as users meet it: names, discovery, and one clear error for each mistake."""

from __future__ import annotations

import pytest

from busbench.errors import ModelError
from busbench.models import create_model, get_spec, list_models

CNN_KEYS = ["unet", "attunet", "unetpp", "unet3p", "unext", "cmunet", "cmunext"]
SMP_KEYS = ["smp_unet", "smp_unetpp", "smp_fpn", "smp_deeplabv3p", "smp_linknet", "smp"]


def test_reference_keys_are_registered_with_paper_and_sizes() -> None:
    names = list_models()
    assert names == sorted(names)
    for key in CNN_KEYS + SMP_KEYS:
        assert key in names
        spec = get_spec(key)
        assert spec.paper and spec.input_sizes
    assert get_spec("unet").input_sizes == "multiple of 16"
    assert get_spec("unext").input_sizes == "multiple of 32"
    assert get_spec("smp_unet").pretrained and not get_spec("unet").pretrained


def test_pattern_discovery() -> None:
    smp = list_models("smp_*")
    assert {"smp_unet", "smp_unetpp", "smp_fpn", "smp_deeplabv3p", "smp_linknet"} <= set(smp)
    assert "unet" not in smp and "smp" not in smp
    assert list_models("cmu*") == ["cmunet", "cmunext"]


def test_unknown_name_lists_valid_names_and_suggests() -> None:
    with pytest.raises(ModelError) as err:
        create_model("unte")
    message = str(err.value)
    assert "Did you mean 'unet'?" in message
    for key in CNN_KEYS + ["smp_unet"]:
        assert key in message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_channels": 2}, "in_channels=2"),
        ({"num_classes": 0}, "num_classes=0"),
        ({"image_size": 100}, "multiples of 16"),
    ],
)
def test_unsupported_settings_are_model_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        create_model("unet", base_width=2, **kwargs)


def test_misspelled_model_param_is_a_clear_error():
    from busbench.errors import ModelError
    from busbench.models import create_model

    with pytest.raises(
        ModelError, match=r"model.params.base_widht is not an option of unet\. Did you mean 'base_width'\?"
    ):
        create_model("unet", base_widht=8)
