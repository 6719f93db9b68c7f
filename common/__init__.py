"""Paper-agnostic core shared by the five projects: models, adapters, routing, eval, training, config."""

# Before anything imports huggingface_hub or transformers (they read these variables once): offline where
# the command needs no hub, timeouts on hub calls; only for our own commands, never over a user's value.
import sys as _sys

from common.hub_env import apply_hub_defaults as _apply_hub_defaults
from common.hub_env import is_entry_point as _is_entry_point

if _is_entry_point(_sys.argv):
    _apply_hub_defaults()

from common import noise

noise.install()  # known-harmless third-party messages, silenced once for every entrypoint (common/noise.py)
