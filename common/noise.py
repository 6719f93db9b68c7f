"""Known-harmless third-party messages, silenced in one place; every other warning still prints.

Each entry names the logger (or warning category), the exact message pattern and why it is harmless here.
`install()` runs once when `common` is imported (every entrypoint imports it): logging filters attach to
the named loggers only, and warnings filters match the message and category exactly.
"""

from __future__ import annotations

import logging
import re
import warnings

# (logger, message regex, why it is harmless)
LOG_MESSAGES: tuple[tuple[str, str, str], ...] = (
    (
        "kernels._internals.hf_hub",
        r"Skipping publisher trust check for '[^']+' because Hugging Face Hub is in offline mode\.",
        "transformers probes the hub kernels (flash-attn) at import; offline runs never load them",
    ),
    (
        "transformers.modeling_utils",
        r"`loss_type=None` was set in the config but it is unrecognized\. Using the default loss: `ForCausalLMLoss`\.",
        "every causal LM config has loss_type=None; the default is the loss we want",
    ),
)

# (category, message regex, why it is harmless)
WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (
        UserWarning,
        r"Detected pickle protocol \d+ in the checkpoint, which was not the default pickle protocol",
        "torch.load(weights_only=True) of a protocol-4 file: the safe unpickler still refuses objects",
    ),
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.fullmatch(record.getMessage())


def install() -> None:
    """Attach the filters (idempotent)."""
    for name, pattern, _ in LOG_MESSAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
    for category, pattern, _ in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
