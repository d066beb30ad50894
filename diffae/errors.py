"""Exceptions for bad user input: the CLI prints their message in one line, without a traceback."""


class DiffaeError(Exception):
    """Base class of every user-facing error diffae raises on purpose."""


class ConfigError(DiffaeError, ValueError):
    """Unknown preset, sampler, option value, or a config that contradicts itself."""


class InputError(DiffaeError, ValueError):
    """An image, latent or array of the wrong shape, dtype, device or with NaN/Inf."""


class DataError(DiffaeError, ValueError):
    """A dataset that is missing, empty, corrupt or inconsistent."""


class CheckpointError(DiffaeError, ValueError):
    """A checkpoint that is missing, truncated, corrupt, or from another preset/format."""


class OutputError(DiffaeError, OSError):
    """An output path that cannot be written, or that would overwrite something."""
