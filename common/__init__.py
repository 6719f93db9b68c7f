"""Paper-agnostic core shared by the five projects: models, adapters, routing, eval, training, config."""

from common import noise

noise.install()  # known-harmless third-party messages, silenced once for every entrypoint (common/noise.py)
