"""One configuration mechanism for every trainer: defaults in a dataclass, recipes in YAML, overrides.

A run's configuration is built in layers, each overriding the one before::

    dataclass defaults  <  recipe YAML (only what differs)  <  -o key=value  <  explicit --field flags

* Defaults are written once, as the dataclass's field defaults (a nested dataclass is a block of keys,
  e.g. CutLER's ``selftrain``).
* A recipe is a YAML mapping of the keys that differ, found by name in the trainer's ``recipes/`` folder
  or given as a path; nested blocks are mappings (``selftrain: {lr: 0.001}``) or dotted keys.
* ``-o key=value`` values are parsed as YAML (``-o min_size=[64]``, ``-o selftrain.lr=0.001``); a mapping
  given for a block updates only the keys it names.
* Unknown keys fail with one message naming the key, where it came from and the known keys; values are
  checked against the field types (an int is fine where a float is expected, ``"abc"`` for an int is not).

The merged configuration is written into the run folder as ``config.yaml`` (:func:`write_config`) and read
back with the same checks (:func:`read_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from nbsupport.core.cli import cli_bool
from nbsupport.core.io import atomic_write_text

#: The file name of a run's merged configuration.
CONFIG_FILE = "config.yaml"


class _Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 booleans (only true / false): ``on``, ``off``, ``yes``, ``no`` stay strings, so a
    key named ``on`` is not read as ``True`` (boolean fields still accept those words, via ``cli_bool``)."""


_Loader.yaml_implicit_resolvers = {
    ch: [r for r in rs if r[0] != "tag:yaml.org,2002:bool"]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(KeyError, ValueError):
    """An unknown key or a value of the wrong type in a recipe, an override or a flag (a ``KeyError`` and a
    ``ValueError``, so either kind of handler catches it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------------
# Schema: the dataclass's fields and their types


def _title(cls) -> str:
    return getattr(cls, "CONFIG_NAME", cls.__name__)


def _schema(cls) -> dict[str, object]:
    """``{field name: resolved type hint}`` of a config dataclass."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"a config must be a dataclass type, got {cls!r}")
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, typing.Any) for f in dataclasses.fields(cls)}


def _block(hint) -> type | None:
    """The dataclass type of a nested block field, else None."""
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def _accepts_str(hint) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return str in typing.get_args(hint)
    return hint is str


def _type_name(hint) -> str:
    if typing.get_origin(hint) is None and hasattr(hint, "__name__"):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _coerce(value, hint, key: str, where: str):
    """``value`` checked against (and lightly converted to) ``hint``; ``ConfigError`` naming ``key`` if it does
    not fit. Conversions: int -> float; a string that reads as a float -> float (YAML 1.1 reads ``1e-3`` as a
    string); a list for a tuple field -> tuple."""

    def bad():
        return ConfigError(
            f"{where}: {key}={value!r} is not a valid {_type_name(hint)} (field {key}: {_type_name(hint)})"
        )

    if hint is typing.Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, where)
            except ConfigError:
                pass
        raise bad()
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return cli_bool(value)
            except argparse.ArgumentTypeError:
                pass
        raise bad()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad()
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise bad()
    if hint in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        kind = origin or hint
        if kind is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad()
            items = [_coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args))]
        else:
            elem = args[0] if args else typing.Any
            items = [_coerce(v, elem, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if kind is tuple else items
    if hint is dict or origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise bad()
    if isinstance(hint, type) and not isinstance(value, hint):
        raise bad()
    return value


# --------------------------------------------------------------------------------------------------
# Plain dicts <-> dataclasses


def config_to_dict(cfg) -> dict:
    """A config dataclass as plain data (nested dicts, lists, numbers, strings, None): what ``config.yaml`` and
    checkpoints hold (``torch.load(weights_only=True)`` reads it back)."""

    def plain(v):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        return v

    return plain(cfg)


def _split_key(key) -> list[str]:
    parts = str(key).split(".")
    if not all(parts):
        raise ConfigError(f"bad config key {key!r} (empty part)")
    return parts


def _set(
    cls, data: dict, path: list[str], value, where: str, prefix: str = "", raw: str | None = None, title: str = ""
) -> None:
    """Set ``data[path...] = value`` after checking the key against ``cls`` and the value against its type.
    ``raw``: the override's text, used as is for a string field whose text YAML read as a number; ``title``:
    the top-level config's name (for messages about nested blocks)."""
    schema = _schema(cls)
    title = title or _title(cls)
    name, dotted = path[0], prefix + path[0]
    if name not in schema:
        scope = f" in block {prefix[:-1]!r}" if prefix else ""
        raise ConfigError(f"{where}: unknown {title} config key {dotted!r}{scope} (known: {', '.join(sorted(schema))})")
    hint = schema[name]
    sub = _block(hint)
    if len(path) > 1:
        if sub is None:
            raise ConfigError(f"{where}: {dotted!r} is not a block of keys, so {prefix}{'.'.join(path)!r} is unknown")
        _set(sub, data[name], path[1:], value, where, dotted + ".", raw, title)
        return
    if sub is not None:
        if isinstance(value, sub):
            data[name] = config_to_dict(value)
            return
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{where}: {dotted} is a block of keys ({', '.join(sorted(_schema(sub)))}), got {value!r}"
            )
        for k, v in value.items():
            _set(sub, data[name], _split_key(str(k)), v, where, dotted + ".", title=title)
        return
    try:
        data[name] = _coerce(value, hint, dotted, where)
    except ConfigError:
        if raw is None or value is None or not _accepts_str(hint):
            raise
        data[name] = _coerce(raw, hint, dotted, where)  # e.g. -o image_root=2024: the text, not the number


def _build(cls, data: dict):
    """``cls`` from checked plain data (values coerced once more, so e.g. a tuple field gets a tuple back)."""
    kw = {}
    for name, hint in _schema(cls).items():
        sub = _block(hint)
        kw[name] = _build(sub, data[name]) if sub is not None else _coerce(data[name], hint, name, cls.__name__)
    return cls(**kw)


def _apply_mapping(cls, data: dict, mapping: Mapping, where: str) -> None:
    for k, v in mapping.items():
        _set(cls, data, _split_key(k), v, where)


def config_from_dict(cls, values: Mapping | None = None, where: str = "config"):
    """``cls`` from a (possibly partial) mapping such as a checkpoint's stored config: missing keys keep their
    defaults, unknown keys and bad values raise :class:`ConfigError` naming ``where``."""
    data = config_to_dict(cls())
    _apply_mapping(cls, data, values or {}, where)
    return _build(cls, data)


# --------------------------------------------------------------------------------------------------
# Recipes and overrides


def list_recipes(recipe_dir) -> list[str]:
    """Names of the recipes (``*.yaml``) in a trainer's recipe folder."""
    return sorted(p.stem for p in Path(recipe_dir).glob("*.yaml")) if recipe_dir else []


def find_recipe(recipe, recipe_dir=None) -> Path:
    """The YAML file of a recipe: a path (anything with a ``.yaml``/``.yml`` suffix or a folder part), or a
    name looked up as ``<recipe_dir>/<name>.yaml``."""
    text = os.fspath(recipe)
    p = Path(text)
    if p.suffix in (".yaml", ".yml") or os.sep in text or "/" in text:
        if not p.is_file():
            raise FileNotFoundError(f"recipe file {p} does not exist")
        return p
    if recipe_dir is not None and (Path(recipe_dir) / f"{text}.yaml").is_file():
        return Path(recipe_dir) / f"{text}.yaml"
    raise FileNotFoundError(
        f"recipe {text!r} not found (recipes in {recipe_dir}: {', '.join(list_recipes(recipe_dir)) or 'none'}; "
        "or give a YAML path)"
    )


def read_recipe(path) -> dict:
    """The mapping a recipe file holds (``{}`` for a file of comments only)."""
    path = Path(path)
    try:
        data = _yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"recipe {path}: expected a mapping of config keys, got {type(data).__name__}")
    return dict(data)


def parse_override(text: str) -> tuple[str, object, str]:
    """``"key=value"`` -> ``(key, YAML-parsed value, value text)``."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. -o lr=0.001 or -o selftrain.lr=0.001)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override -o {text}: the value is not valid YAML ({e})") from None
    return key, value, raw.strip()


def _apply_overrides(cls, data: dict, overrides) -> None:
    if overrides is None:
        return
    if isinstance(overrides, Mapping):
        for k, v in overrides.items():
            _set(cls, data, _split_key(k), v, f"override {k}={v!r}")
        return
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        key, value, raw = parse_override(text)
        _set(cls, data, _split_key(key), value, f"override -o {text}", raw=raw)


def load_config(cls, recipe=None, recipe_dir=None, overrides=None, flags: Mapping | None = None):
    """Build a ``cls`` config: defaults < ``recipe`` (a name in ``recipe_dir`` or a YAML path; None = none) <
    ``overrides`` (``["key=value", ...]`` as ``-o`` gives them, or a ``{dotted key: value}`` dict) < ``flags``
    (``{field: value}`` of the command-line options given explicitly)."""
    data = config_to_dict(cls())
    if recipe:
        path = find_recipe(recipe, recipe_dir)
        _apply_mapping(cls, data, read_recipe(path), f"recipe {path}")
    _apply_overrides(cls, data, overrides)
    for k, v in (flags or {}).items():
        _set(cls, data, _split_key(k), v, f"flag --{str(k).replace('_', '-')}")
    return _build(cls, data)


def recipe_diff(cfg, base=None) -> dict:
    """``{dotted key: value}`` of the fields where ``cfg`` differs from ``base`` (default: its class's defaults):
    what a recipe producing ``cfg`` has to list."""
    a, b = config_to_dict(cfg), config_to_dict(base if base is not None else type(cfg)())
    out = {}

    def walk(x, y, prefix):
        for k, v in x.items():
            if isinstance(v, dict) and isinstance(y.get(k), dict):
                walk(v, y[k], f"{prefix}{k}.")
            elif v != y.get(k):
                out[prefix + k] = v

    walk(a, b, "")
    return out


# --------------------------------------------------------------------------------------------------
# Command line


def _yaml_arg(text: str):
    try:
        return _yaml(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not valid YAML: {e}") from None


def _arg_type(hint):
    """argparse ``type=`` for a field type: int/float/str as such, booleans strictly, anything else YAML."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else typing.Any
    if hint is bool:
        return cli_bool, "BOOL"
    if hint in (int, float, str):
        return hint, None
    return _yaml_arg, "YAML"


def add_config_options(
    parser: argparse.ArgumentParser,
    cls,
    recipe_option: str = "--recipe",
    recipe_default: str | None = None,
    recipe_help: str = "",
    choices: Mapping[str, Iterable] | None = None,
) -> None:
    """Add every field of ``cls`` as ``--field-name`` (default None = not given; booleans as ``true``/``false``;
    lists as YAML, e.g. ``--min-size "[96, 128]"``; nested blocks only through ``-o``), the recipe option
    (``dest="recipe"``) and ``-o/--set KEY=VALUE`` (``dest="overrides"``). :func:`config_from_args` reads
    them back."""
    choices = dict(choices or {})
    defaults = cls()
    for name, hint in _schema(cls).items():
        if _block(hint) is not None:
            continue
        typ, metavar = _arg_type(hint)
        default = getattr(defaults, name)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=typ,
            default=None,
            metavar=metavar,
            choices=list(choices[name]) if name in choices else None,
            help=f"(default: {default!r})",
        )
    parser.add_argument(
        recipe_option,
        dest="recipe",
        default=recipe_default,
        help=recipe_help
        or "recipe name (in the trainer's recipes/ folder) or YAML path; the options below override it",
    )
    add_overrides_option(
        parser, "config override, value parsed as YAML (e.g. -o lr=0.001, -o selftrain.lr=0.001); flags win over it"
    )


def add_overrides_option(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """The repeatable ``-o/--set KEY=VALUE`` option (values parsed as YAML), collected in ``args.overrides``:
    the override option of every command that reads a config."""
    parser.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def config_from_args(cls, args: argparse.Namespace, recipe_dir=None):
    """The config of options added by :func:`add_config_options`: defaults < ``--recipe`` < ``-o`` < flags. A bad
    key, value or recipe name ends the command with its message (``SystemExit``), as argparse does."""
    flags = {n: getattr(args, n) for n in _schema(cls) if getattr(args, n, None) is not None}
    try:
        return load_config(cls, getattr(args, "recipe", None), recipe_dir, getattr(args, "overrides", None), flags)
    except (ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


# --------------------------------------------------------------------------------------------------
# config.yaml in a run folder


def write_config(cfg, run_dir) -> Path:
    """Write the merged ``cfg`` to ``<run_dir>/config.yaml`` (atomically); returns the path."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    header = f"# {_title(type(cfg))} run configuration (defaults < recipe < -o overrides < flags), as trained\n"
    return atomic_write_text(Path(run_dir) / CONFIG_FILE, header + text)


def read_config(cls, path):
    """A ``cls`` config from a ``config.yaml`` file or a run folder holding one (same checks as a recipe)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    return config_from_dict(cls, read_recipe(path), f"config {path}")
