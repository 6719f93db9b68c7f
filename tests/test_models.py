"""Model families, micro models, the papers' configs on `meta`, and `load_model`."""

import pytest
import torch

from common.device import resolve_device
from common.models import (
    FAMILIES,
    build_meta,
    count_parameters,
    load_model,
    micro_config,
    micro_model,
    paper_config,
    paper_config_files,
)

# Published parameter counts. Each paper config must build to within 1% of its figure.
PAPER_COUNTS = {
    # 124M: the GPT-2 small checkpoint, as in nanoGPT's README ("gpt2 ... 124M").
    "gpt2": 124.4e6,
    # 125M: EleutherAI's model name and card ("GPT-Neo 125M").
    "EleutherAI/gpt-neo-125m": 125.2e6,
    # 783M / 2.85B / 248M: Hugging Face model pages of T5 v1.1 large, XL and Flan-T5 base
    # ("Model size" from the safetensors metadata); v1.1 has an untied lm_head.
    "google/t5-large-lm-adapt": 783e6,
    "google/t5-xl-lm-adapt": 2.85e9,
    "google/flan-t5-base": 247.6e6,
    # 151.28M / 427.62M: open_clip's docs/model_profile.csv (ViT-B-32, ViT-L-14 "params").
    "openai/clip-vit-base-patch32": 151.28e6,
    "openai/clip-vit-large-patch14": 427.62e6,
    # 7.24B: the Hugging Face model page of Mistral-7B-v0.1 ("7.24B params").
    "mistralai/Mistral-7B-v0.1": 7.24e9,
}


def test_every_shipped_paper_config_has_a_published_count():
    assert sorted(paper_config_files()) == sorted(PAPER_COUNTS)


@pytest.mark.parametrize("hub_id", sorted(PAPER_COUNTS))
def test_paper_config_builds_on_meta_with_the_published_parameter_count(hub_id):
    model = build_meta(hub_id)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert count_parameters(model) == pytest.approx(PAPER_COUNTS[hub_id], rel=0.01)


def test_gpt2_count_matches_the_closed_form_with_the_tied_head_counted_once():
    cfg = paper_config("gpt2")
    model = build_meta(cfg)
    v, p, d, layers = cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer
    # embeddings + per block (attn 4d^2+4d, mlp 8d^2+5d, 2 layer norms 4d) + final layer norm
    assert count_parameters(model) == v * d + p * d + layers * (12 * d * d + 13 * d) + 2 * d == 124_439_808
    assert model.lm_head.weight is model.transformer.wte.weight


def test_t5_v1_1_keeps_its_own_lm_head():
    for model in (build_meta("google/flan-t5-base"), micro_model("t5")):
        assert model.lm_head.weight is not model.shared.weight
        assert model.encoder.embed_tokens.weight is model.shared.weight


def test_clip_towers_and_projections_add_up_to_the_full_model():
    cfg = paper_config("openai/clip-vit-base-patch32")
    vision, text = build_meta(cfg, "clip_vision"), build_meta(cfg, "clip_text")
    projections = (cfg.vision_config.hidden_size + cfg.text_config.hidden_size) * cfg.projection_dim
    total = count_parameters(vision) + count_parameters(text) + projections + 1  # + logit_scale
    assert total == count_parameters(build_meta(cfg))


def test_count_parameters_trainable_only():
    model = micro_model("gpt2")
    model.transformer.wte.weight.requires_grad_(False)  # also the tied lm_head
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - 256 * 16


def _output(model, family):
    """The main output of a micro model on a fixed input."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 250, (2, 7), generator=gen)
    pixels = torch.randn(2, 3, 8, 8, generator=gen)
    with torch.no_grad():
        if family == "t5":
            return model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
        if family == "clip":
            return model(input_ids=ids, pixel_values=pixels).logits_per_image
        if family == "clip_vision":
            return model(pixel_values=pixels).pooler_output
        if family == "clip_text":
            return model(input_ids=ids).pooler_output
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_micro_model_round_trips_through_save_pretrained(family, tmp_path):
    model = micro_model(family)
    assert 1_000 < count_parameters(model) < 100_000
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)  # family read from config.json
    assert type(loaded) is FAMILIES[family].model_class
    assert not loaded.training
    torch.testing.assert_close(_output(loaded, family), _output(model, family), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "t5", "clip"])
def test_micro_model_is_deterministic_for_a_seed(family):
    a, b, c = micro_model(family, seed=3), micro_model(family, seed=3), micro_model(family, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_micro_model_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    micro_model("mistral", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_micro_config_overrides_merge_into_sub_configs():
    cfg = micro_config("clip", vision_config={"image_size": 16}, projection_dim=8)
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.projection_dim) == (16, 4, 8)
    assert micro_config("mistral", num_hidden_layers=1).num_hidden_layers == 1


def test_unknown_family_and_fields_name_the_close_match():
    with pytest.raises(KeyError, match=r"unknown model family 'mistrall'\. Did you mean 'mistral'"):
        micro_model("mistrall")
    with pytest.raises(KeyError, match=r"no field 'hiden_size'\. Did you mean 'hidden_size'"):
        micro_config("llama", hiden_size=8)
    with pytest.raises(KeyError, match="Did you mean 'google/flan-t5-base'"):
        paper_config("google/flan-t5-bass")


def test_load_model_picks_a_clip_tower_from_a_full_checkpoint(tmp_path):
    clip = micro_model("clip")
    clip.save_pretrained(tmp_path)
    vision = load_model(tmp_path, "clip_vision")
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            vision(pixel_values=pixels).pooler_output, clip.vision_model(pixel_values=pixels).pooler_output
        )
    with pytest.raises(ValueError, match="holds a 'clip' model, not a 'gpt2' one"):
        load_model(tmp_path, "gpt2")


def test_load_model_casts_to_the_requested_dtype(tmp_path):
    micro_model("llama").save_pretrained(tmp_path)
    assert {p.dtype for p in load_model(tmp_path, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


def test_load_model_with_a_hub_id_offline_asks_for_a_local_path():
    with pytest.raises(OSError, match="'gpt2' is a hub id and this machine is offline; pass a local path"):
        load_model("gpt2")
    with pytest.raises(FileNotFoundError, match="no model directory at runs/x/model"):
        load_model("runs/x/model")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_a_clear_error(tmp_path):
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="'cuda' was requested but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        load_model(tmp_path, device="cuda:0")  # fails before touching the (empty) directory


def test_resolve_device_rejects_unknown_names():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
