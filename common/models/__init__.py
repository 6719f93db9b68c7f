"""Model families, micro models for tests, the papers' base-model configs, and `load_model`.

- `FAMILIES`: gpt2, gpt_neo, t5 (v1.1 / LM-adapt / Flan), clip, clip_vision, clip_text, mistral, llama.
- `micro_model(family, seed)`: a random model of a few thousand parameters, deterministic per seed.
- `paper_config(hub_id)` / `build_meta(hub_id)`: the real architectures, on `meta`, with no network.
- `load_model(path)`: `from_pretrained` with the family read from the config.
"""

from common.models.families import (
    FAMILIES,
    Family,
    build_model,
    count_parameters,
    family_config,
    family_of,
    micro_config,
    micro_model,
)
from common.models.loading import hub_offline, load_model
from common.models.paper import PAPER_CONFIG_DIR, build_meta, paper_config, paper_config_files

__all__ = [
    "FAMILIES",
    "PAPER_CONFIG_DIR",
    "Family",
    "build_meta",
    "build_model",
    "count_parameters",
    "family_config",
    "family_of",
    "hub_offline",
    "load_model",
    "micro_config",
    "micro_model",
    "paper_config",
    "paper_config_files",
]
