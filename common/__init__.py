"""Paper-agnostic core shared by the five projects: models, adapters, routing, eval, training, config."""
