# `common` first: it sets the hub variables (offline where a command needs no hub, timeouts) before any
# project module imports transformers, which reads them once (common/hub_env.py).
import common  # noqa: F401
