"""Every leaderboard entry: importing this module registers each project's entries in `ENTRIES`.

A project adds its methods in `leaderboard/<project>.py` (entries calling `projects.<name>`, registered
with `leaderboard.registry.register`) and one import line here.
"""

from __future__ import annotations

from leaderboard import (
    baselines,  # noqa: F401  (registers base, oracle, multitask, uniform, task_arithmetic)
    mats,  # noqa: F401  (registers ties, fisher_diag[_true], regmean, mats_cg, cg_*)
    mbc_arrow,  # noqa: F401  (arrow, arrow_gks, mbc_oracle, mbc_uniform, mbc_arrow)
    phatgoose,  # noqa: F401  (phatgoose, retrieval, average_activation, merged_experts, best_single_expert)
    smile,  # noqa: F401  (smile, smile_top8)
)
from leaderboard.registry import (  # noqa: F401  (the names entries and tests use)
    ENTRIES,
    Candidate,
    Context,
    adapter_params,
    count,
    expert_states,
    lora_deltas,
    register,
    with_adapter,
    with_state,
    with_weights,
)
