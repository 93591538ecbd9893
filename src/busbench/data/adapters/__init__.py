"""Dataset adapters: raw on-disk layouts -> :class:`RawSample` lists and decoded arrays.

Use :func:`get_adapter` with a dataset key (``busi``, ``curated_busi``, ``busbra``, ``bus_uc``, ``bus_uclm``,
``yap2018``, or a key registered by a plugin); each key's module documents its layout and quirk rules. A dataset
of your own uses the generic ``folder`` layout under a key you choose: ``get_adapter(key, layout="folder")``
(see :mod:`busbench.data.adapters.folder`).
"""

from busbench.data.adapters.base import (
    ADAPTERS,
    CLASS_VALUES,
    LABELS,
    LAYOUTS,
    Adapter,
    DecodedSample,
    RawSample,
    adapter_source,
    check_dataset_key,
    dataset_keys,
    get_adapter,
    layout_names,
    load_adapters,
    register_adapter,
    register_layout,
)

__all__ = [
    "ADAPTERS",
    "CLASS_VALUES",
    "LABELS",
    "LAYOUTS",
    "Adapter",
    "DecodedSample",
    "RawSample",
    "adapter_source",
    "check_dataset_key",
    "dataset_keys",
    "get_adapter",
    "layout_names",
    "load_adapters",
    "register_adapter",
    "register_layout",
]
