"""`load_model`: a pretrained model from a local directory (or a hub id when online), by family."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel

from common.device import resolve_device
from common.models.families import FAMILIES, family_of
from common.registry import lookup

# "gpt2", "google/flan-t5-base": at most one "/", no leading "." or "/" (those are paths).
_HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[\w.-]+)?$")
# from_pretrained kwargs that say where the files are, so the config is read from the same place.
_LOCATION_KWARGS = ("gguf_file", "revision", "subfolder", "cache_dir")
_LOCAL_PATH_HINT = (
    "pass a local path (a directory written by save_pretrained, with config.json and the weights), "
    "or build a random one with common.models.micro_model"
)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set to a true value."""
    values = (os.environ.get(key, "").upper() for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(value in {"1", "ON", "YES", "TRUE"} for value in values)


def load_model(
    name_or_path: str | os.PathLike,
    family: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "auto",
    **kw: Any,
) -> PreTrainedModel:
    """The family's `from_pretrained`, in eval mode, on `device` ("auto": cuda if available, else cpu);
    the family is read from `config.model_type` if not given."""
    device = resolve_device(device)  # fail before reading gigabytes
    source = str(name_or_path)
    is_local = Path(source).expanduser().is_dir()
    if is_local:
        source = str(Path(source).expanduser())
    elif not _HUB_ID.match(source):
        raise FileNotFoundError(f"no model directory at {source}")
    try:
        config = AutoConfig.from_pretrained(source, **{k: kw[k] for k in _LOCATION_KWARGS if k in kw})
    except OSError as e:
        if is_local:
            raise
        why = (
            "this machine is offline"
            if hub_offline()
            else "it could not be fetched (hub unreachable or no such model)"
        )
        raise OSError(f"{source!r} is a hub id and {why}; {_LOCAL_PATH_HINT}") from e
    family = family or family_of(config)
    fam = lookup(FAMILIES, family, "model family")
    if config.model_type not in (fam.model_type, fam.part_of):
        raise ValueError(f"{source} holds a {config.model_type!r} model, not a {family!r} one")
    model = fam.model_class.from_pretrained(source, dtype=dtype, **kw)
    return model.to(device).eval()
