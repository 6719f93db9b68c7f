"""common.noise drops the listed third-party messages exactly and keeps everything else."""

import logging
import warnings

from common import noise


def test_known_log_lines_are_dropped_and_others_kept(caplog):
    noise.install()
    noise.install()  # idempotent: one filter per logger and pattern
    kernels = logging.getLogger("kernels._internals.hf_hub")
    assert sum(isinstance(f, noise._DropMatching) for f in kernels.filters) == 1
    with caplog.at_level(logging.WARNING):
        kernels.warning(
            "Skipping publisher trust check for 'kernels-community/flash-attn2' because Hugging Face Hub is in offline mode."
        )
        kernels.warning("Skipping publisher trust check for 'x/y': 401 Unauthorized")  # a real failure
        logging.getLogger("transformers.modeling_utils").warning(
            "`loss_type=None` was set in the config but it is unrecognized. Using the default loss: `ForCausalLMLoss`."
        )
        logging.getLogger("transformers.modeling_utils").warning("Some weights were not initialized")
    assert [r.getMessage() for r in caplog.records] == [
        "Skipping publisher trust check for 'x/y': 401 Unauthorized",
        "Some weights were not initialized",
    ]


def test_known_warning_is_ignored_and_other_warnings_still_show():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        noise.install()
        warnings.warn(
            "Detected pickle protocol 4 in the checkpoint, which was not the default pickle protocol used by `torch.load` (2).",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn(
            "Detected pickle protocol 4 in the checkpoint, which was not the default pickle protocol",
            DeprecationWarning,
            stacklevel=1,
        )
        warnings.warn("something else went wrong", UserWarning, stacklevel=1)
    assert [(w.category, str(w.message)[:20]) for w in seen] == [
        (DeprecationWarning, "Detected pickle prot"),
        (UserWarning, "something else went "),
    ]
