"""PEFT 0.21's per-layer LoRA / IA3 config fields, with PEFT's semantics: which layers a config selects
(``target_modules``, ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``: PEFT's
``check_target_module_exists``), the pattern key that gives a layer its own rank or alpha (``rank_pattern``,
``alpha_pattern``: PEFT's ``get_pattern_key``), and the checks PEFT's ``LoraConfig`` makes on these fields.
Pure name logic on module names; :mod:`adapter_engine.config` and the loading / saving code use it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any


def regex_list(owner: str, name: str, value: Any) -> list[str] | str | None:
    """PEFT's ``exclude_modules`` / ``layers_pattern``: None, one regex string, or a list of names (sorted)."""
    if value is None or isinstance(value, str):
        if value is not None:
            _compiles(owner, name, value)
        return value
    value = sorted(value) if isinstance(value, set) else list(value) if isinstance(value, tuple) else value
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{owner}: {name} must be a string or a list of names, got {value!r}")
    return value or None


def _compiles(owner: str, name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{owner}: {name} {pattern!r} is not a valid regular expression: {err}") from None


def pattern_key(patterns: Mapping[str, Any], name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key (a regex, in the dict's order) that matches the whole ``name`` or
    the part after one of its dots (``re.match(rf"(.*\\.)?({key})$", name)``); None when no key matches."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", name)), None)


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """PEFT's layer index of a module name: the number after the first ``<layers_pattern>.`` (any pattern), or, with
    no pattern, the first number that follows a dotted segment (``encoder.layer.3.x`` -> 3)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match["idx"]) if match else None


def peft_selects(cfg: Any, name: str, targets: list[str] | str | None = None) -> bool:
    """PEFT 0.21's ``check_target_module_exists`` for a LoRA / IA3 config on a module's full ``name``.

    ``exclude_modules`` (a regex fullmatching the name, or list entries matching it or a dotted suffix of it) wins;
    then ``targets`` (default ``cfg.target_modules``): a regex fullmatches the name (``"all-linear"``: the caller
    selected linear layers), a list entry equals it (then the layer filter is skipped, as in PEFT) or is a dotted
    suffix of it; a suffix hit must then lie in ``layers_to_transform`` (see :func:`_layer_index`)."""
    targets = cfg.target_modules if targets is None else targets
    exclude = getattr(cfg, "exclude_modules", None)
    if exclude and (re.fullmatch(exclude, name) if isinstance(exclude, str) else _listed(name, exclude)):
        return False
    if isinstance(targets, str):
        return targets.lower() == "all-linear" or re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    layers = getattr(cfg, "layers_to_transform", None)
    if layers is None or layers == []:
        return True
    index = _layer_index(name, getattr(cfg, "layers_pattern", None))
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


def _listed(name: str, entries: Sequence[str]) -> bool:
    return name in entries or any(name.endswith("." + e) for e in entries)


def check_layer_fields(cfg: Any) -> None:
    """Check and normalise LoraConfig's per-layer fields as PEFT's LoraConfig does (and refuses what it refuses)."""
    owner = "LoraConfig"
    cfg.exclude_modules = regex_list(owner, "exclude_modules", cfg.exclude_modules)
    cfg.layers_pattern = regex_list(owner, "layers_pattern", cfg.layers_pattern)
    layers = cfg.layers_to_transform
    layers = sorted(layers) if isinstance(layers, (set, tuple)) else layers
    if layers is not None and not (
        isinstance(layers, int)
        and not isinstance(layers, bool)
        and layers >= 0
        or isinstance(layers, list)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
    ):
        raise ValueError(f"{owner}: layers_to_transform must be a layer index or a list of them, got {layers!r}")
    cfg.layers_to_transform = layers
    if isinstance(cfg.target_modules, str) and (layers is not None or cfg.layers_pattern is not None):
        which = "layers_to_transform" if layers is not None else "layers_pattern"
        raise ValueError(f"{owner}: {which} cannot be used when target_modules is a str ({cfg.target_modules!r})")
    if cfg.layers_pattern and layers is None:
        raise ValueError(f"{owner}: layers_pattern={cfg.layers_pattern!r} needs layers_to_transform")
    for name, check in (("rank_pattern", _positive_int), ("alpha_pattern", _finite_number)):
        patterns = getattr(cfg, name)
        patterns = {} if patterns is None else patterns
        if not isinstance(patterns, Mapping):
            raise ValueError(f"{owner}: {name} must be a dict of layer-name patterns, got {patterns!r}")
        for key, value in patterns.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"{owner}: {name} keys must be layer-name patterns, got {key!r}")
            _compiles(owner, f"{name} key", key)
            if not check(value):
                raise ValueError(f"{owner}: {name}[{key!r}] must be a {check.__doc__}, got {value!r}")
        setattr(cfg, name, dict(patterns))


def _positive_int(value: Any) -> bool:
    """positive int"""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite_number(value: Any) -> bool:
    """finite number"""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
