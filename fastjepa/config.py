"""Run configuration: dataclasses mirroring the official I-JEPA YAML sections; load, override, validate, dump.

The official recipes (``configs/in1k_vith14_ep300.yaml`` ...) load unchanged. Sections and keys are the official
ones (``data``, ``logging``, ``mask``, ``meta``, ``optimization``) plus fastjepa's ``fastjepa`` (method-level
options) and ``train`` (trainer options).

A key the file leaves out takes the value all four official recipes share (the paper's settings: masks,
optimizer, schedules, augmentation). Where the recipes differ, the default is ``src/helper.py``'s ``init_model``
default (``vit_base``, patch 16, crop 224, predictor depth 6 and width 384) or the in1k ViT-H/14 recipe's value
(batch 128, 300 epochs, 40 warmup epochs). ``ipe_scale`` defaults to 1.0 as ``src/train.py`` documents it (the
unused ``init_opt`` signature says 1.25). ``data.root_path`` and ``logging.folder`` default to "" (unset).

Every user error (unknown key, wrong type, impossible setting) raises :class:`ConfigError` at load, naming the
dotted key, the value, the nearest valid key or the valid choices, and the fix. Paths are not checked at load
(the official recipes carry ``$replace_this_with_...`` placeholders): the trainer calls
:meth:`Config.require_paths` before it builds anything.

``python -m fastjepa.config PATH [section.key=value ...]`` prints the resolved config as YAML.
"""

import argparse
import difflib
import importlib.resources
import os
import sys
import types
import typing
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from fastjepa.config_sections import (
    ConfigError,
    Data,
    Eval,
    FastJepa,
    Logging,
    Mask,
    Meta,
    Optimization,
    Section,
    Train,
    check_mask_sampling,
    fail,
    is_section,
    key_type,
    section_keys,
    show,
)

# Keys fastjepa renamed: loading the old name says what to write instead.
RENAMED_KEYS = {"fastjepa.fused": "fastjepa.kernel_backend (auto: fused Triton ops where they run; reference: the "
                                  "PyTorch references everywhere)"}

# The shipped configs: package data of fastjepa.configs (the top-level configs/ folder of a source checkout).
CONFIG_DIR = Path(str(importlib.resources.files("fastjepa.configs")))

# --------------------------------------------------------------------------------------------------------------
# The whole config.
# --------------------------------------------------------------------------------------------------------------

# Paths a run may need; a value is a placeholder while empty or while it holds a "$name" that is not an
# environment variable (the official recipes ship "$replace_this_with_...").
PATH_KEYS = ("data.root_path", "data.image_folder", "logging.folder")


@dataclass
class Config:
    """A resolved run configuration. Sections in the official files' order, then fastjepa's."""

    data: Data = field(default_factory=Data)
    logging: Logging = field(default_factory=Logging)
    mask: Mask = field(default_factory=Mask)
    meta: Meta = field(default_factory=Meta)
    optimization: Optimization = field(default_factory=Optimization)
    fastjepa: FastJepa = field(default_factory=FastJepa)
    train: Train = field(default_factory=Train)
    eval: Eval = field(default_factory=Eval)

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        crop, patch = self.data.crop_size, self.mask.patch_size
        if crop % patch:
            near = sorted({max(patch, crop // patch * patch), (crop // patch + 1) * patch})
            fail("data.crop_size", crop, f"not divisible by mask.patch_size={patch} (the image is cut into "
                 "patch_size x patch_size patches)", f"set data.crop_size to {' or '.join(map(str, near))}, "
                 "or pick a mask.patch_size that divides it")
        check_mask_sampling(self.data, self.mask, self.fastjepa.mode)

    def validate(self) -> "Config":
        """Re-run every check (types, ranges, cross-section), e.g. after changing fields in place."""
        for section in self.sections():
            section.__post_init__()
        self._check()
        return self

    def sections(self) -> Iterator[Section]:
        return (getattr(self, f.name) for f in fields(self))

    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        """Build from a nested dict as YAML gives it; missing sections and keys take their defaults."""
        if not isinstance(raw, dict):
            raise ConfigError(f"expected a mapping of sections ({', '.join(_SECTIONS)}), got {type(raw).__name__}. "
                              "Fix: write the config as 'section:' lines with indented 'key: value' lines")
        for name, values in raw.items():
            if name not in _SECTIONS:
                _unknown(str(name), values)
        sections = {}
        for name, section_cls in _SECTIONS.items():
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                fail(name, values, "a section must be a mapping of keys", f"write '{name}:' then indented "
                     f"'key: value' lines; {name} accepts: {', '.join(_keys(section_cls))}")
            for key, value in _flat(values, section_cls):
                if key not in _keys(section_cls) and key not in _field_names(section_cls):
                    _unknown(f"{name}.{key}", value)
            sections[name] = section_cls(**values)
        return cls(**sections)

    def to_dict(self) -> dict:
        """Plain nested dict (tuples as lists) in the official key order; YAML-able, and loads back equal."""
        return {s.name: s.to_dict() for s in self.sections()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def dump(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    def get(self, key: str):
        """Value of a dotted key, e.g. ``cfg.get("data.root_path")`` or ``cfg.get("fastjepa.sigreg.weight")``."""
        value = self
        for name in key.split("."):
            value = getattr(value, name)
        return value

    def placeholder_paths(self, keys: Iterable[str] = PATH_KEYS) -> dict[str, str]:
        """The path keys among ``keys`` that are still unset: empty, or holding an unexpanded ``$name``."""
        unset = {}
        for key in keys:
            value = self.get(key)
            if not value or "$" in os.path.expandvars(value):
                unset[key] = value
        return unset

    def require_paths(self, keys: Iterable[str] = PATH_KEYS) -> None:
        """Raise ConfigError for the first of ``keys`` that is still a placeholder (call before building)."""
        for key, value in self.placeholder_paths(keys).items():
            what = "is empty" if not value else "still holds a placeholder (or an unset environment variable)"
            fail(key, value, f"{what}; this run needs a real path there",
                 f"pass the override {key}=/absolute/path or edit the config file")


_SECTIONS = {f.name: f.type for f in fields(Config)}


def _keys(section_cls) -> list[str]:
    return section_keys(section_cls)


def _field_names(section_cls) -> list[str]:
    """A section's own fields (a sub-section by its name, e.g. ``sigreg``)."""
    return [f.name for f in fields(section_cls)]


def _flat(values: dict, section_cls) -> Iterator[tuple[str, object]]:
    """A section's YAML mapping as (key, value) pairs, a sub-section's mapping flattened as ``sub.key``."""
    for key, value in values.items():
        tp = key_type(section_cls, key) if key in _field_names(section_cls) else None
        if is_section(tp) and isinstance(value, dict):
            yield from ((f"{key}.{k}", v) for k, v in _flat(value, tp))
        else:
            yield str(key), value


def _all_keys() -> list[str]:
    return [f"{s}.{k}" for s, cls in _SECTIONS.items() for k in _keys(cls)]


def _unknown(key: str, value) -> typing.NoReturn:
    """Error for an unknown section or key, with the nearest valid one (also across sections)."""
    if key in RENAMED_KEYS:
        raise ConfigError(f"{key}={show(value)}: renamed. Fix: use {RENAMED_KEYS[key]}", key=key)
    section, _, name = key.partition(".")
    if not name:
        close = difflib.get_close_matches(section, _SECTIONS, n=1)
        valid = ", ".join(_SECTIONS)
        hint = f"did you mean {close[0]}? " if close else ""
        fix = f"rename it to {close[0]}" if close else "remove it"
        raise ConfigError(f"{key}: unknown section; {hint}valid sections: {valid}. Fix: {fix}", key=key)
    if section in _SECTIONS:
        candidates = [f"{section}.{k}" for k in _keys(_SECTIONS[section])]
        close = difflib.get_close_matches(key, candidates, n=1) or [k for k in _all_keys() if k.endswith("." + name)]
    else:
        candidates = _all_keys()
        close = difflib.get_close_matches(key, candidates, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    fix = f"rename it to {close[0]}" if close else "remove it"
    valid = ", ".join(k.split(".", 1)[1] for k in candidates) if section in _SECTIONS else ", ".join(_SECTIONS)
    where = f"{section} accepts" if section in _SECTIONS else "valid sections"
    raise ConfigError(f"{key}={show(value)}: unknown key; {hint}{where}: {valid}. Fix: {fix}", key=key)


def _parse_override(text: str) -> tuple[str, str, object]:
    """``section.key=value`` -> (section, key, value); the value is read as YAML, except for string fields,
    which take the text as written (so ``logging.write_tag=2024`` is the string "2024")."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or "." not in key:
        raise ConfigError("expected section.key=value. Fix: write it like optimization.lr=5e-4", key=key)
    section, name = key.split(".", 1)
    if section not in _SECTIONS or name not in [*_keys(_SECTIONS[section]), *_field_names(_SECTIONS[section])]:
        _unknown(key, raw)
    tp = key_type(_SECTIONS[section], name)
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
    if tp is str or (optional and str in typing.get_args(tp) and raw.strip() not in ("", "null", "~")):
        return section, name, raw
    try:
        return section, name, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"the value is not valid YAML ({e}). Fix: write YAML values, e.g. "
                          "mask.aspect_ratio=[0.75,1.5]", key=key) from None


def resolve(path: str | os.PathLike) -> Path:
    """The config file for ``path``; a bare name like ``test_tiny`` also finds ``configs/test_tiny.yaml``."""
    p = Path(path)
    if p.is_file():
        return p
    if p.parent == Path("."):
        for candidate in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
            if candidate.is_file():
                return candidate
    shipped = sorted(f.name for f in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(p.name, shipped, n=1)
    hint = f" (did you mean {CONFIG_DIR / close[0]}?)" if close else ""
    raise ConfigError(f"config file {str(path)!r} not found{hint}. Fix: pass an existing YAML file or one of "
                      f"the shipped configs in {CONFIG_DIR}: {', '.join(shipped)}")


def load(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """Read a config file (official recipes unchanged), apply ``section.key=value`` overrides, validate.

    Raises ConfigError, prefixed with the file or the override it comes from.
    """
    path = resolve(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}. Fix: correct the YAML syntax at that line") from None
    sources = {}
    for text in overrides:
        try:
            section, name, value = _parse_override(text)
        except ConfigError as e:
            raise ConfigError(f"override {text!r}: {e}", key=e.key) from None
        if not isinstance(raw, dict) or not isinstance(raw.get(section) or {}, dict):
            break  # from_dict reports the malformed file
        raw[section] = raw.get(section) or {}
        *parents, leaf = name.split(".")
        target = raw[section]
        for parent in parents:  # a sub-section's key, e.g. fastjepa.sigreg.weight
            target[parent] = target.get(parent) if isinstance(target.get(parent), dict) else {}
            target = target[parent]
        target[leaf] = value
        sources[f"{section}.{name}"] = f"override {text!r}"
    try:
        return Config.from_dict(raw)
    except ConfigError as e:
        # Name the overrides the error involves (its key, or keys its message cites), else the file.
        involved = [s for k, s in sources.items() if e.key and e.key.split("[")[0] == k or f"{k}=" in str(e)]
        raise ConfigError(f"{', '.join(involved) or path}: {e}", key=e.key) from None


@contextmanager
def exit_on_config_error():
    """Turn a ConfigError into ``error: <message>`` on stderr and exit status 2, without a traceback."""
    try:
        yield
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def load_or_exit(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """:func:`load` for command-line entry points: a user error ends the process with status 2."""
    with exit_on_config_error():
        return load(path, overrides)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fastjepa config",
        description="Load, validate and print a fastjepa / official I-JEPA config as resolved YAML.",
    )
    parser.add_argument("config", help="YAML file, or the name of a config shipped in configs/ (e.g. test_tiny)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optimization.lr=5e-4")
    args = parser.parse_args(argv)
    print(load_or_exit(args.config, args.overrides).to_yaml(), end="")


if __name__ == "__main__":
    main()
