"""Paper-scale configs built on `meta`: the upscaled models' parameter counts equal the paper's."""

import pytest

from projects.smile.main import dry_run, resolve

CASES = [
    # (method overrides, modelpool, total parameters in the paper's notebooks / tables)
    (["method.gate_k=16", "method.k=32"], "CLIPVisionModelPool/clip-vit-base-patch32_TA8", 141.1e6),
    (["method.gate_k=16", "method.k=32"], "CLIPVisionModelPool/clip-vit-large-patch14_TA8", 446.3e6),
    (["method.gate_k=4", "method.k=16"], "Seq2SeqLMPool/flan-t5-base_glue", 312.4e6),
    (["method.gate_k=8", "method.k=128"], "Seq2SeqLMPool/flan-t5-base_glue", 728.0e6),
    (
        ["method.gate_k=2", "method.k=4", "method.targets=[q,v]"],
        "Seq2SeqLMPool/flan-t5-base_glue_lora16",
        252.0e6,
    ),
]


@pytest.mark.parametrize(("overrides", "pool", "paper"), CASES)
def test_smile_parameter_counts_match_the_paper(overrides, pool, paper):
    cfg = resolve(["method=smile_upscaling/smile_upscaling", f"modelpool={pool}", "dry_run=true", *overrides])
    info = dry_run(cfg)["model_info"]
    assert info["added_params"] == info["added_params_formula"]
    assert abs(info["all_params"] - paper) <= 0.0015 * paper  # the paper rounds to 0.1M


@pytest.mark.parametrize(
    ("k", "version", "paper"), [(8, 4, 7.33e9), (512, 4, 11.30e9), (8, 1, 7.27e9), (512, 1, 8.59e9)]
)
def test_smile_mistral_parameter_counts_match_the_paper(k, version, paper):
    cfg = resolve(
        [
            "method=smile_upscaling/smile_mistral_upscaling",
            "method.rank_of_router=8",
            f"method.rank_of_expert={k}",
            f"modelpool=smile_mistral_exp_v{version}",
            "dry_run=true",
        ]
    )
    info = dry_run(cfg)["model_info"]
    assert info["upscaled_layers"] == 224 and info["added_params"] == info["added_params_formula"]
    assert abs(info["all_params"] - paper) <= 0.005e9
