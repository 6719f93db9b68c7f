"""The papers' base models as facts: their real configs (architecture fields only), built on `meta`.

`build_meta("mistralai/Mistral-7B-v0.1")` gives the exact module tree and parameter shapes with no
weights and no network, for shape checks and parameter counts at paper scale.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from common.io import read_json
from common.models.families import build_model
from common.registry import lookup

# One JSON file per hub id, named with "/" -> "--"; each holds the config and the URL it was copied from.
PAPER_CONFIG_DIR = Path(__file__).parent / "paper_configs"


def paper_config_files() -> dict[str, Path]:
    """Hub id -> its shipped config file."""
    return {path.stem.replace("--", "/"): path for path in sorted(PAPER_CONFIG_DIR.glob("*.json"))}


def paper_config(hub_id: str) -> PretrainedConfig:
    """The transformers config of a paper's base model, from the JSON shipped in `paper_configs/`."""
    fields = dict(read_json(lookup(paper_config_files(), hub_id, "paper model"))["config"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.name_or_path = hub_id
    return config


def build_meta(hub_id_or_config: str | PretrainedConfig, family: str | None = None) -> PreTrainedModel:
    """The model on the `meta` device: real shapes, no storage. `family` picks a tower (`clip_vision`)."""
    config = paper_config(hub_id_or_config) if isinstance(hub_id_or_config, str) else hub_id_or_config
    with torch.device("meta"):
        return build_model(config, family)
