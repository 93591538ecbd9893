"""Dataset adapters: raw on-disk layouts -> :class:`RawSample` lists and decoded arrays.

Use :func:`get_adapter` with a dataset key (``busi``, ``curated_busi``, ``busbra``, ``bus_uc``, ``bus_uclm``,
``yap2018``); each key's module documents its layout and quirk rules.
"""

from busbench.data.adapters.base import (
    ADAPTERS,
    CLASS_VALUES,
    LABELS,
    Adapter,
    DecodedSample,
    RawSample,
    dataset_keys,
    get_adapter,
    load_adapters,
    register_adapter,
)

__all__ = [
    "ADAPTERS",
    "CLASS_VALUES",
    "LABELS",
    "Adapter",
    "DecodedSample",
    "RawSample",
    "dataset_keys",
    "get_adapter",
    "load_adapters",
    "register_adapter",
]
