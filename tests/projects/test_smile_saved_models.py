"""Saved SMILE CLIP vision and T5 models: `method.model_path` writes a `save_pretrained` folder of the
registered SMILE classes, which round-trips through the Auto classes with identical outputs, and which a
plain CLIP / T5 loader refuses instead of returning a model with the SMILE weights missing."""

import copy
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from common.models import load_model, micro_model
from projects.smile.methods import load_upscaled, smile_upscaling
from projects.smile.smile_models import SmileCLIPVisionModel, SmileT5ForConditionalGeneration
from projects.smile.upscale import SmileMoELinear
from tests.cli import REPO

CFG = {
    "device": "cpu",
    "gate_k": 2,
    "k": 4,
    "top_k": 1,
    "routing_use_diff": True,
    "full_matrices": True,
    "average_experts": False,
}


def _experts(base, n=2, skip=""):
    """n fine-tuned copies: every Linear but those whose name contains `skip` moved."""
    out = {}
    for i in range(n):
        g = torch.Generator().manual_seed(10 + i)
        model = copy.deepcopy(base)
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, torch.nn.Linear) and not (skip and skip in name):
                    m.weight += 0.1 * torch.randn(m.weight.shape, generator=g)
        out[f"task{i}"] = model
    return out


def _t5_inputs():
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(2, 250, (2, 7), generator=g),
        "decoder_input_ids": torch.randint(2, 250, (2, 5), generator=g),
    }


def test_smile_clip_vision_folder_round_trips_through_automodel(tmp_path):
    base = micro_model("clip_vision", seed=0)
    # the value projections stay pretrained: a saved model must record which layers are upscaled
    model, info = smile_upscaling(
        {**CFG, "model_path": str(tmp_path / "m")}, base, _experts(base, skip="v_proj")
    )
    assert isinstance(model, SmileCLIPVisionModel)
    assert info["smile"]["skipped_layers"] and all("v_proj" in n for n in info["smile"]["skipped_layers"])
    config = AutoConfig.from_pretrained(tmp_path / "m")
    assert config.model_type == "smile_clip_vision_model"
    assert list(config.smile_layers) == info["smile"]["upscaled_layers"]
    assert list(config.smile_experts) == ["task0", "task1"]
    reloaded = AutoModel.from_pretrained(tmp_path / "m").eval()
    assert isinstance(reloaded, SmileCLIPVisionModel)
    assert sum(isinstance(m, SmileMoELinear) for m in reloaded.modules()) == len(
        info["smile"]["upscaled_layers"]
    )
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=x).pooler_output, model(pixel_values=x).pooler_output)
    assert torch.equal(
        load_upscaled(tmp_path / "m")(pixel_values=x).pooler_output, model(pixel_values=x).pooler_output
    )
    # the common loader asked for a plain CLIP vision tower refuses a SMILE folder
    with pytest.raises(ValueError, match="smile_clip_vision_model"):
        load_model(tmp_path / "m", "clip_vision")


def test_smile_t5_folder_with_tied_embeddings_round_trips_through_automodel(tmp_path):
    base = micro_model("t5", seed=0)
    assert base.encoder.embed_tokens.weight is base.shared.weight  # tied: a raw safetensors save fails
    model, info = smile_upscaling({**CFG, "model_path": str(tmp_path / "m")}, base, _experts(base))
    assert isinstance(model, SmileT5ForConditionalGeneration)
    assert "lm_head" in info["smile"]["upscaled_layers"]
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "m").eval()
    assert isinstance(reloaded, SmileT5ForConditionalGeneration)
    assert reloaded.encoder.embed_tokens.weight is reloaded.shared.weight
    with torch.no_grad():
        # equal up to float rounding (the reloaded model may take another attention kernel): 1e-5 relative
        torch.testing.assert_close(
            reloaded(**_t5_inputs()).logits, model(**_t5_inputs()).logits, rtol=1e-5, atol=1e-5
        )
        out = reloaded.generate(_t5_inputs()["input_ids"], max_new_tokens=3, do_sample=False)
        assert torch.equal(out, model.generate(_t5_inputs()["input_ids"], max_new_tokens=3, do_sample=False))


def test_saving_an_unsupported_family_fails_before_upscaling(tmp_path):
    base = micro_model("gpt_neo", seed=0)
    with pytest.raises(ValueError, match="smile_mistral_upscaling"):
        smile_upscaling({**CFG, "model_path": str(tmp_path / "m")}, base, _experts(base))
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("family", ["clip_vision", "t5"])
def test_plain_transformers_refuses_a_smile_folder(tmp_path, family):
    base = micro_model(family, seed=0)
    smile_upscaling({**CFG, "model_path": str(tmp_path / "m")}, base, _experts(base))
    # a user without the SMILE classes imported: AutoModel does not know the model type (it used to load a
    # plain model with the attention and MLP weights randomly initialised)
    auto = "AutoModel" if family == "clip_vision" else "AutoModelForSeq2SeqLM"
    code = f"import transformers; transformers.{auto}.from_pretrained({str(tmp_path / 'm')!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "smile_" in proc.stderr
