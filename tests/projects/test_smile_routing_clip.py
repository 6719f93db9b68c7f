"""SMILE routing of a CLIP vision tower's image tokens (`projects.smile.routing.image_routing`), the CLIP task
pool's `routing: N` option and analyze.py's routing table and heat map, on a micro tower built here."""

import copy

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from common.io import read_json
from common.rundir import RunDir
from projects.smile.routing import (
    image_routing,
    own_expert_by_layer,
    own_expert_share,
    route_counts_images,
)
from projects.smile.upscale import SmileMoELinear, smile_upscale

KINDS = {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
TOKENS_PER_IMAGE = (8 // 4) ** 2 + 1  # 8×8 images in 4×4 patches, and the class token


def _tower() -> CLIPVisionModel:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
        projection_dim=8,
    )
    return CLIPVisionModel(config).eval()


def _smile(tower: CLIPVisionModel) -> nn.Module:
    experts = {}
    for i, name in enumerate(("a", "b")):
        ft = copy.deepcopy(tower)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for m in ft.modules():
                if isinstance(m, nn.Linear):
                    m.weight += 0.1 * torch.randn(m.weight.shape, generator=g)
        experts[name] = ft
    return smile_upscale(tower, experts, gate_k=2, k=2)[0].eval()


def _layers(model: nn.Module) -> dict[str, SmileMoELinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SmileMoELinear)}


def _images() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"a": torch.randn(5, 3, 8, 8, generator=g), "b": torch.randn(2, 3, 8, 8, generator=g)}


def test_image_routing_counts_every_token_of_every_layer():
    model = _smile(_tower())
    layers = _layers(model)
    assert len(layers) == 2 * len(KINDS)  # every Linear of both encoder layers is upscaled
    images = _images()
    r = image_routing(model, images, batch_size=2)  # batches of 2, 2, 1 for "a"
    for domain, found in r.items():
        n = len(images[domain])
        assert found["tokens"] == n * TOKENS_PER_IMAGE
        assert found["decisions"] == n * TOKENS_PER_IMAGE * len(layers)
        assert list(found["by_layer"]) == ["0", "1"] and set(found["by_kind"]) == KINDS
        for shares in (found["all"], *found["by_layer"].values(), *found["by_kind"].values()):
            assert len(shares) == 2 and sum(shares) == pytest.approx(1.0)
    # the batch size changes nothing
    assert image_routing(model, images, batch_size=64) == r
    with pytest.raises(ValueError, match="SMILE layers"):
        image_routing(_tower(), images)


def test_image_counts_equal_each_layers_own_route_of_its_input():
    """q, k and v of encoder layer i read layer_norm1(hidden state i): their top-1 counts are `layer.route` of
    it, computed from the tower's hidden states, without the hooks."""
    model = _smile(_tower())
    images = _images()
    counts, tokens = route_counts_images(model, images, batch_size=3)
    names = {m: n for n, m in _layers(model).items()}
    encoder = getattr(model, "vision_model", model).encoder  # transformers 5 drops the vision_model wrapper
    for domain, pixels in images.items():
        assert tokens[domain] == len(pixels) * TOKENS_PER_IMAGE
        # hidden_states: the encoder's input (pre_layrnorm of the embeddings), then each encoder layer's output
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        for i, block in enumerate(encoder.layers):
            x = block.layer_norm1(hidden[i]).reshape(-1, 16)
            for kind in ("q_proj", "k_proj", "v_proj"):
                layer = getattr(block.self_attn, kind)
                want = torch.bincount(layer.route(x)[1][:, 0], minlength=2).double()
                assert names[layer].endswith(f"layers.{i}.self_attn.{kind}")
                torch.testing.assert_close(counts[domain][names[layer]], want)
                assert want.sum() == len(pixels) * TOKENS_PER_IMAGE


def test_forced_routing_gives_known_shares_per_layer():
    """Expert a's router rows zeroed in layer 0 (‖V_aᵀx‖ = 0 < ‖V_bᵀx‖: every token to b) and b's in layer 1
    (every token to a): by layer [0, 1] then [1, 0], overall half and half (both layers have six SMILE layers)."""
    model = _smile(_tower())
    for name, layer in _layers(model).items():
        rows = slice(0, layer.gate_k) if ".layers.0." in name else slice(layer.gate_k, 2 * layer.gate_k)
        layer.gate.weight.data[rows] = 0
    r = image_routing(model, _images())
    for found in r.values():
        assert found["by_layer"] == {"0": [0.0, 1.0], "1": [1.0, 0.0]}
        assert found["all"] == [0.5, 0.5]
    assert own_expert_by_layer(r, ["a", "b"]) == {"a": [0.0, 1.0], "b": [1.0, 0.0]}
    assert own_expert_share(r, ["a", "b"]) == {"a": 0.5, "b": 0.5}


def test_clip_task_pool_reports_routing_of_n_evenly_spaced_images():
    from projects.smile.pools import CLIPTaskPool

    tower = _tower()
    model = _smile(tower)
    images = _images()
    pool = CLIPTaskPool.__new__(CLIPTaskPool)
    pool.cfg = {"batch_size": 4, "routing": 2}
    pool.data = {t: (px, torch.zeros(len(px), dtype=torch.long)) for t, px in images.items()}
    pool.text = {t: nn.functional.normalize(torch.randn(3, 8), dim=-1) for t in images}
    pool.projection = nn.Linear(16, 8, bias=False)
    pool.logit_scale = 1.0
    report = pool.evaluate(model)
    want = image_routing(model, {"a": images["a"][[0, 4]], "b": images["b"]})  # rows 0 and N-1
    assert report["routing"] == want and report["routing"]["a"]["tokens"] == 2 * TOKENS_PER_IMAGE
    assert "routing" not in pool.evaluate(tower)  # no SMILE layer: nothing to report
    pool.cfg = {"batch_size": 4}
    assert "routing" not in pool.evaluate(model)


def _routing_run(root, seed, own, layer0):
    """One seed's `main.py ... +taskpool.routing=N` run folder for experts a, b: own-expert shares per task
    `own` over all layers, `layer0` in encoder layer 0 (layer 1 then holds 2·own − layer0)."""
    experts = ["a", "b"]
    routing = {}
    for i, t in enumerate(experts):
        share = lambda s, i=i: [s, 1 - s] if i == 0 else [1 - s, s]  # noqa: E731
        layers = {"0": share(layer0[t]), "1": share(2 * own[t] - layer0[t])}
        routing[t] = {"all": share(own[t]), "by_layer": layers, "tokens": 10}
    metrics = {
        "model_info": {"smile": {"experts": experts, "gate_k": 4, "k": 1, "top_k": 1}},
        "a": {"accuracy": 0.2 + seed / 10},
        "b": {"accuracy": 0.4},
        "average": {"accuracy": 0.3},
        "routing": routing,
    }
    rd = RunDir(
        root / "clip_distinct" / "routing" / f"seed_{seed}_gate_k=4_k=1",
        project="smile",
        experiment="tiny_clip_distinct_routing",
        scale="tiny",
        seed=seed,
        config={},
    )
    rd.write_results(metrics)


def test_clip_routing_table_and_heat_map_by_hand(tmp_path):
    from projects.smile import analyze

    _routing_run(tmp_path, 1, {"a": 0.3, "b": 0.7}, {"a": 0.2, "b": 0.6})
    _routing_run(tmp_path, 0, {"a": 0.1, "b": 0.5}, {"a": 0.0, "b": 0.6})
    routings = analyze.clip_routings(tmp_path)
    assert [r["seed"] for r in routings] == [0, 1]
    assert routings[0]["own_share"] == {"a": 0.1, "b": 0.5} and routings[0]["chance"] == 0.5
    assert routings[1]["own_share_by_layer"]["a"] == pytest.approx([0.2, 0.4])
    assert routings[0]["favourite"] == {"a": ["b", 0.9], "b": ["a", 0.5]}  # ties go to the first expert
    rows = analyze.clip_routing_table(routings)
    assert [r["task"] for r in rows] == ["a", "b", "mean over tasks"]
    assert rows[0]["own expert, all layers (%)"] == "20.0 ± 14.1"  # 10 and 30
    assert rows[0]["accuracy (%)"] == "25.0 ± 7.1" and rows[0]["layer 1 (%)"] == "30.0 ± 14.1"  # 20, 40
    assert rows[1]["layer 0 (%)"] == "60.0 ± 0.0"
    assert rows[2]["own expert, all layers (%)"] == "40.0 ± 14.1"  # (0.1 + 0.5) / 2, (0.3 + 0.7) / 2
    assert rows[0]["most chosen expert, per seed"] == "b 90%, b 70%"
    # analyze.py with only routing runs under `runs`: the routing section and the task × layer heat map
    analyze.main([f"runs={tmp_path}", f"out={tmp_path / 'table'}"])
    heat = read_json(tmp_path / "table" / "clip_distinct_routing_own_share.json")
    assert (tmp_path / "table" / "clip_distinct_routing_own_share.png").is_file()
    assert heat["tasks"] == ["a", "b"] and heat["layers"] == [0, 1] and heat["chance"] == 0.5
    assert heat["share"][0] == pytest.approx([0.1, 0.3]) and heat["seeds"] == [0, 1]
    assert heat["own_share_by_seed"]["1"] == {"a": 0.3, "b": 0.7}
    assert "own expert, all layers (%)" in (tmp_path / "table" / "table.md").read_text()
