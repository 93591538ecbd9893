"""Narrow versions of the CNN zoo that keep every stage of each architecture, shared by the model and export tests."""

TINY_CNN = {
    "unet": {"base_width": 4},
    "attunet": {"base_width": 4},
    "unetpp": {"encoder": "resnet18", "decoder_widths": (8, 8, 16, 32)},
    "unet3p": {"base_width": 4},
    "unext": {"widths": (4, 8, 16, 24, 32)},
    "cmunet": {"base_width": 4, "mixer_depth": 2},
    "cmunext": {"widths": (4, 8, 16, 24, 32), "depths": (1, 1, 1, 2, 1)},
}
