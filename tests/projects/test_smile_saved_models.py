"""Saved SMILE CLIP vision and T5 models: `method.model_path` writes a `save_pretrained` folder of the
registered SMILE classes, which round-trips through the Auto classes with identical outputs, and which a
plain CLIP / T5 loader refuses instead of returning a model with the SMILE weights missing."""

import copy
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from common.models import count_parameters, load_model, micro_model
from projects.smile.methods import load_upscaled, smile_upscaling
from projects.smile.smile_models import SmileCLIPVisionModel, SmileT5ForConditionalGeneration
from projects.smile.upscale import SmileMoELinear, smile_upscale
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
    # B comes back in the layout upscaling gave it (a contiguous copy takes another GEMM path: last-bit
    # differences on some CPUs, and a copy of B per call)
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert [n for n in saved if n.endswith("expert_u") and saved[n].stride() != loaded[n].stride()] == []
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


@pytest.mark.parametrize("scale_decoder_outputs", [False, True], ids=["v1.1_own_head", "v1.0_tied_head"])
def test_smile_t5_with_lm_head_left_pretrained_keeps_its_head(tmp_path, scale_decoder_outputs):
    # the LoRA arm (deltas only in q and v): lm_head is skipped. transformers 5 says tie_word_embeddings=True
    # for every T5, and the saved-model class used to call tie_weights(), which wrote the embedding over a
    # T5 v1.1 head: fewer parameters than the base, other logits. A v1.0 T5 must keep its tied head.
    base = micro_model("t5", seed=0, tie_word_embeddings=scale_decoder_outputs)
    assert (base.lm_head.weight is base.shared.weight) == scale_decoder_outputs
    experts = {}
    for name, expert in _experts(base).items():  # only q and v move, as a merged LoRA on q, v does
        with torch.no_grad():
            for (key, w), (_, w0) in zip(expert.named_parameters(), base.named_parameters(), strict=True):
                if not key.endswith((".q.weight", ".v.weight")):
                    w.copy_(w0)
        experts[name] = expert
    in_memory, upscale_info = smile_upscale(base, experts, gate_k=2, k=4)  # the base class, no saving
    model, info = smile_upscaling({**CFG, "model_path": str(tmp_path / "m")}, base, experts)
    assert isinstance(model, SmileT5ForConditionalGeneration)
    assert "lm_head" in info["smile"]["skipped_layers"]
    assert {n.rpartition(".")[2] for n in info["smile"]["upscaled_layers"]} == {"q", "v"}
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "m").eval()
    for m in (model, reloaded):
        assert (m.lm_head.weight is m.shared.weight) == scale_decoder_outputs
        assert torch.equal(m.lm_head.weight, base.lm_head.weight)
        assert count_parameters(m) == count_parameters(base) + upscale_info.added_parameters
        assert count_parameters(m) == count_parameters(in_memory)
    with torch.no_grad():
        want = in_memory(**_t5_inputs()).logits
        torch.testing.assert_close(model(**_t5_inputs()).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reloaded(**_t5_inputs()).logits, want, rtol=1e-5, atol=1e-5)


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
