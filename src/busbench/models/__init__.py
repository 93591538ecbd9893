"""Model zoo: every architecture is built through :func:`create_model`."""

from busbench.models.base import SegModel
from busbench.models.registry import create_model, get_spec, list_models, model_specs, register_model

__all__ = ["SegModel", "create_model", "get_spec", "list_models", "model_specs", "register_model"]
