"""Checkpoints: state_dicts plus the config as JSON, written atomically, loaded with weights_only.

Writing goes to a temporary file in the same directory, is fsynced, then renamed over the old
file, so a crash leaves either the old checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch

from ..config import Config
from ..errors import CheckpointError, OutputError

FORMAT_VERSION = 1


def save(path: str | Path, payload: dict) -> None:
    path = Path(path)
    payload = {"format": FORMAT_VERSION, **payload}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write checkpoint {path}: {exc.strerror or exc}; "
                          "the previous checkpoint is untouched") from None


def load(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"corrupt or truncated checkpoint {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(payload, dict) or "config" not in payload or "model" not in payload:
        raise CheckpointError(f"{path} is not a diffae checkpoint")
    version = payload.get("format")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version}; this diffae reads format {FORMAT_VERSION}")
    return payload


def config_of(payload: dict, path: str | Path = "checkpoint") -> Config:
    try:
        import json
        return Config.from_dict(json.loads(payload["config"]))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: its config is unreadable ({exc})") from None


def load_model_state(model: torch.nn.Module, state: dict, path: str | Path, what: str = "model") -> None:
    """load_state_dict with a message that names the mismatch instead of a wall of keys."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(f"{path}: {what} weights do not fit this architecture ({first})") from None
