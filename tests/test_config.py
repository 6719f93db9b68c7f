import json

import pytest

from common.config import ConfigError, expand_sweeps, get_path, interpolate, load_config, parse_overrides

DEFAULTS = {
    "lr": 1e-3,
    "method": {"name": "smile", "gate_k": 1, "k": 128},
    "modelpool": {"models": [{"name": "a", "path": "x"}, {"name": "b", "path": "y"}]},
}


def test_precedence_flags_over_overrides_over_files_over_defaults(tmp_path):
    f1 = tmp_path / "a.yaml"
    f1.write_text("lr: 0.5\nmethod:\n  gate_k: 4\n")
    f2 = tmp_path / "b.json"
    f2.write_text(json.dumps({"method": {"gate_k": 8, "k": 16}}))
    cfg = load_config(
        DEFAULTS, [f1, f2], ["method.k=32", "lr=0.25"], flags={"lr": 0.125, "method.name": None}
    )
    assert cfg["lr"] == 0.125  # flag beats override
    assert cfg["method"] == {
        "name": "smile",
        "gate_k": 8,
        "k": 32,
    }  # later file beats earlier, override beats file
    assert DEFAULTS["method"]["k"] == 128  # defaults untouched


def test_override_value_types_and_list_index():
    cfg = load_config(DEFAULTS, overrides=["modelpool.models.1.path=/tmp/m", "lr=3", "method.name=null"])
    assert cfg["modelpool"]["models"][1]["path"] == "/tmp/m"
    assert cfg["lr"] == 3 and isinstance(cfg["lr"], int)
    assert cfg["method"]["name"] is None
    assert parse_overrides(["a=[1, 2]", "+b=x"]) == [("a", [1, 2], False), ("b", "x", True)]


def test_unknown_key_names_close_match(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'method.gatek'.*method.gate_k"):
        load_config(DEFAULTS, overrides=["method.gatek=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  kk: 3\n")
    with pytest.raises(ConfigError, match=r"method.kk.*bad.yaml.*method.k"):
        load_config(DEFAULTS, [bad])
    # `+key=value` adds a deliberate new key
    assert load_config(DEFAULTS, overrides=["+method.extra=1"])["method"]["extra"] == 1


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(DEFAULTS, [tmp_path / "missing.yaml"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(DEFAULTS, overrides=["lr"])
    with pytest.raises(ConfigError, match="out of range"):
        load_config(DEFAULTS, overrides=["modelpool.models.5.path=z"])
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(DEFAULTS, [lst])
    with pytest.raises(ConfigError, match=r"no key 'method\.kay'"):
        get_path(DEFAULTS, "method.kay")


def test_interpolation_resolves_references_after_overrides():
    cfg = load_config(
        {**DEFAULTS, "out": "runs/g${method.gate_k}_k${method.k}.json", "k_copy": "${method.k}"},
        overrides=["method.k=32"],
    )
    assert cfg["out"] == "runs/g1_k32.json"  # the override, not the default, and written as text
    assert cfg["k_copy"] == 32  # a whole-value reference keeps the type
    chained = interpolate({"a": "${b}", "b": "${c.0}", "c": [{"x": 1}], "d": "x${b.x}"})
    assert chained == {"a": {"x": 1}, "b": {"x": 1}, "c": [{"x": 1}], "d": "x1"}


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"a": "${b}", "b": "${a}"}, "interpolation cycle: b -> a -> b"),
        ({"a": "${methd.k}", "method": {"k": 1}}, "config has no key 'methd.k'.*method.k"),
        ({"a": "${now:%H}"}, r"resolvers \(now:...\) are not supported"),
        ({"a": "x${b", "b": 1}, "unclosed"),
    ],
)
def test_interpolation_errors_name_the_reference(cfg, message):
    with pytest.raises(ConfigError, match=message):
        interpolate(cfg)


def test_sweeps_expand_to_the_product_and_need_multirun():
    jobs = expand_sweeps(["m=smile", "k=4,8", "g=1,2", "l=[1,2]", "s='a,b'"], multirun=True)
    assert [j[1:3] for j in jobs] == [["k=4", "g=1"], ["k=4", "g=2"], ["k=8", "g=1"], ["k=8", "g=2"]]
    assert all(j[0] == "m=smile" and j[3:] == ["l=[1,2]", "s='a,b'"] for j in jobs)
    assert expand_sweeps(["k=4", "l=[1,2]"], multirun=False) == [["k=4", "l=[1,2]"]]
    with pytest.raises(ConfigError, match=r"'k=4,8' is a sweep: add -m"):
        expand_sweeps(["k=4,8"], multirun=False)
