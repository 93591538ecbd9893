"""busbench: a config-driven benchmark for breast-ultrasound lesion segmentation."""

__version__ = "0.1.0"
