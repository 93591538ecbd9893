"""User-facing errors.

Every problem a user can fix (bad input data, a typo in a config, an unknown key) is raised as a
:class:`BusbenchError` whose message names the offending file or key and says how to fix it. The CLI
prints the message on one line and exits non-zero; tracebacks are kept for real bugs.
"""


class BusbenchError(Exception):
    """An error the user can act on; the message is shown as-is."""


class ConfigError(BusbenchError):
    """Invalid configuration: unknown key, wrong type, out-of-range value."""


class DataError(BusbenchError):
    """Invalid or missing input data: folders, images, masks, metadata, manifests."""


class ModelError(BusbenchError):
    """Unknown model, unsupported input size, incompatible weights."""
