"""Configs: YAML/JSON files plus `key=value` overrides, validated against the defaults' keys.

Precedence, highest first: explicit flags > `key=value` overrides > config files (later beats earlier)
> defaults. Keys are dotted paths into nested mappings; integer parts index lists
(`modelpool.models.0.path=...`). A key absent from the defaults is an error naming the close matches,
unless it is written `+key=value` (a deliberate new key, as in Hydra). Values may refer to other keys as
OmegaConf does, `${method.k}`, resolved once the config is complete.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from common.cli import UserError
from common.registry import close_matches

Config = dict[str, Any]


class ConfigError(UserError):
    """A bad config file, key or value."""


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), f"a {type(value).__name__}"
    )


def check_type(key: str, default: Any, value: Any, where: str) -> None:
    """Refuse `value` for `key` when its type cannot stand in for the default's (`k=four` where k is 4).

    Numbers and booleans are strict (an int may stand for a float); `null` is always allowed (it means
    "off" for many keys), and so is anything where the default is `null` or a string.
    """
    if value is None or default is None or isinstance(default, str):
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    elif isinstance(default, Mapping):
        ok = isinstance(value, Mapping)
    else:
        return
    if not ok:
        raise ConfigError(
            f"config key {key!r} = {value!r} (from {where}) must be {_type_name(default)}, "
            f"like its default {default!r}; fix the value"
        )


def parse_value(text: str) -> Any:
    """Parse an override value as a YAML scalar/list (`3` -> int, `[1,2]` -> list, `null` -> None)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def read_config_file(path: str | os.PathLike) -> Config:
    """Read one YAML or JSON config file (JSON is YAML); the top level must be a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {e.start}: {e.object[e.start : e.start + 1]!r}); "
            "save it as UTF-8"
        ) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse config file {path}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping at top level, not {type(data).__name__}")
    return dict(data)


def _all_keys(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, Mapping):
        keys = []
        for k, v in tree.items():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_all_keys(v, full + "."))
        return keys
    return []


def _unknown_key(key: str, schema: Any, where: str) -> ConfigError:
    hint = close_matches(key, _all_keys(schema))
    return ConfigError(f"unknown config key {key!r} (from {where}).{hint}")


def set_path(cfg: MutableMapping[str, Any], key: str, value: Any, *, strict: bool, where: str) -> None:
    """Set dotted `key` in `cfg`; with `strict`, every part of the path must already exist."""
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.lstrip("-").isdigit():
                raise ConfigError(
                    f"{key!r} (from {where}): {'.'.join(parts[:i])} is a list, index it by number"
                )
            idx = int(part)
            if not -len(node) <= idx < len(node):
                raise ConfigError(
                    f"{key!r} (from {where}): index {idx} out of range for a list of length {len(node)}"
                )
            if last:
                if strict:
                    check_type(key, node[idx], value, where)
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, MutableMapping):
            raise ConfigError(f"{key!r} (from {where}): {'.'.join(parts[:i])} is a value, not a mapping")
        if part not in node:
            if strict:
                raise _unknown_key(key, cfg, where)
            if not last:
                node[part] = {}
        if last:
            if strict and part in node:
                check_type(key, node[part], value, where)
            node[part] = value
        else:
            node = node[part]


def merge(base: Config, update: Mapping[str, Any], *, strict: bool, where: str, _prefix: str = "") -> Config:
    """Deep-merge `update` into a copy of `base`; mappings merge, everything else replaces."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        full = f"{_prefix}{k}"
        if k not in out:
            if strict:
                hint = close_matches(full, [_prefix + key for key in _all_keys(out)])
                raise ConfigError(f"unknown config key {full!r} (from {where}).{hint}")
            out[k] = copy.deepcopy(v)
        elif isinstance(out[k], Mapping) and isinstance(v, Mapping):
            out[k] = merge(dict(out[k]), v, strict=strict, where=where, _prefix=full + ".")
        else:
            if strict:
                check_type(full, out[k], v, where)
            out[k] = copy.deepcopy(v)
    return out


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any, bool]]:
    """`["a.b=3", "+new=x"]` -> [("a.b", 3, False), ("new", "x", True)] (the flag marks a new key)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, _, value = item.partition("=")
        key = key.strip()
        is_new = key.startswith("+")
        key = key.lstrip("+")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        parsed.append((key, parse_value(value), is_new))
    return parsed


def split_sweep(value: str) -> list[str]:
    """Hydra's sweep syntax `a,b,c` -> ["a", "b", "c"]; commas inside [], {}, () or quotes do not split."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(value):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(value[start:i])
            start = i + 1
    return [*items, value[start:]]


def expand_sweeps(args: Sequence[str], *, multirun: bool) -> list[list[str]]:
    """`key=value` arguments -> one argument list per job: the product of every `key=a,b` sweep, the
    last key varying fastest (Hydra's basic sweeper). Without `multirun` a sweep is refused, as in Hydra.
    """
    jobs: list[list[str]] = [[]]
    for item in args:
        key, sep, value = item.partition("=")
        options = split_sweep(value) if sep else [value]
        if len(options) > 1 and not multirun:
            raise ConfigError(
                f"{item!r} is a sweep: add -m (--multirun) to run each value; write [{value}] for a list "
                f"or quote it ({key}='{value}') for a string"
            )
        jobs = [[*job, f"{key}{sep}{o}"] for job in jobs for o in options]
    return jobs


def load_config(
    defaults: Mapping[str, Any] | None = None,
    files: Sequence[str | os.PathLike] = (),
    overrides: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
    *,
    strict: bool = True,
) -> Config:
    """Resolve a config: defaults < files < `key=value` overrides < flags (None-valued flags are unset),
    then its `${...}` references. With `strict` (the default when `defaults` is given) every key must exist
    in the defaults.
    """
    strict = strict and defaults is not None
    cfg: Config = copy.deepcopy(dict(defaults or {}))
    for f in files:
        schema = cfg
        data = read_config_file(f)
        cfg = merge(schema, data, strict=strict, where=str(f))
    for key, value, is_new in parse_overrides(overrides):
        set_path(cfg, key, value, strict=strict and not is_new, where="command line")
    for key, value in (flags or {}).items():
        if value is not None:
            set_path(cfg, key, value, strict=strict, where=f"flag --{key}")
    return interpolate(cfg)


_REF = re.compile(r"\$\{([^${}]*)\}")


def interpolate(cfg: Config) -> Config:
    """Resolve OmegaConf-style references: a value that is exactly `${a.b}` takes a.b's value (its type
    kept); `${a.b}` inside a longer string is replaced by str(value). References may chain; cycles, missing
    keys and resolvers (`${now:...}`, `${oc.env:...}`) are errors. OmegaConf is not a dependency and the
    configs are plain dicts, so this small resolver serves the one feature the configs use.
    """

    def resolve_key(key: str, stack: tuple[str, ...]) -> Any:
        if ":" in key:
            raise ConfigError(
                f"${{{key}}}: resolvers ({key.split(':')[0]}:...) are not supported; write the value"
            )
        if key in stack:
            raise ConfigError(f"interpolation cycle: {' -> '.join((*stack, key))}")
        node: Any = cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            if isinstance(node, str):  # a reference on the way (`${b.x}` where b is `${c}`)
                node = resolve(node, (*stack, ".".join(parts[:i])))
            if isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, Mapping) and part in node:
                node = node[part]
            else:
                raise ConfigError(
                    f"${{{key}}}: config has no key {key!r}.{close_matches(key, _all_keys(cfg))}"
                )
        return resolve(node, (*stack, key))

    def resolve(value: Any, stack: tuple[str, ...]) -> Any:
        if isinstance(value, Mapping):
            return {k: resolve(v, stack) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, stack) for v in value]
        if not isinstance(value, str) or "${" not in value:
            return value
        whole = _REF.fullmatch(value)
        if whole:
            return resolve_key(whole.group(1).strip(), stack)
        out = _REF.sub(lambda m: str(resolve_key(m.group(1).strip(), stack)), value)
        if "${" in out:
            raise ConfigError(f"cannot resolve {value!r}: nested or unclosed ${{...}}")
        return out

    return resolve(cfg, ())


def check_at_least(cfg: Mapping[str, Any], minimums: Mapping[str, int], where: str) -> None:
    """Refuse an integer key below its minimum (`--batch_size 0`, `--context 0`, `--seed -1`) up front,
    before it fails deep inside a run as a ZeroDivisionError or an IndexError. `where` names the sources."""
    for key, low in minimums.items():
        value = get_path(cfg, key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"config key {key!r} = {value!r} (from {where}) must be an integer >= {low}")


def get_path(cfg: Mapping[str, Any], key: str) -> Any:
    """Read dotted `key` from `cfg`, with a clear error when it is missing."""
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, list) and part.lstrip("-").isdigit():
            node = node[int(part)]
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            raise ConfigError(f"config has no key {key!r}.{close_matches(key, _all_keys(cfg))}")
    return node


def dump_config(cfg: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(cfg), sort_keys=False)
