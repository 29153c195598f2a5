"""The one config mechanism (nbsupport.core.config): dataclass defaults < YAML recipe < -o key=value < flags,
unknown keys and bad types named with their source, nested blocks, config.yaml round trip."""

import argparse
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from nbsupport.core.config import (
    ConfigError,
    add_config_options,
    config_from_args,
    config_from_dict,
    find_recipe,
    load_config,
    read_config,
    recipe_diff,
    write_config,
)


@dataclass
class Inner:
    lr: float = 0.01
    steps: list[int] = field(default_factory=list)
    on: bool = False


@dataclass
class Toy:
    CONFIG_NAME: ClassVar[str] = "Toy"

    name: str = "a"
    n: int = 3
    lr: float = 0.5
    flag: bool = True
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    pair: tuple[int, int] = (1, 2)
    path: str | None = None
    cover: float | None = 0.5
    mode: str = "x"
    inner: Inner = field(default_factory=Inner)


@pytest.fixture
def recipes(tmp_path):
    (tmp_path / "small.yaml").write_text("# only what differs\nn: 5\ninner:\n  lr: 0.1\n")
    (tmp_path / "empty.yaml").write_text("# nothing differs: comments only\n")
    (tmp_path / "typo.yaml").write_text("n: 5\nlrr: 0.1\n")
    (tmp_path / "nested_typo.yaml").write_text("inner:\n  lrr: 0.1\n")
    return tmp_path


def test_a_recipe_lists_only_what_differs(recipes):
    cfg = load_config(Toy, "small", recipes)
    assert cfg == Toy(n=5, inner=Inner(lr=0.1))
    assert recipe_diff(cfg) == {"n": 5, "inner.lr": 0.1}
    assert load_config(Toy, "empty", recipes) == Toy() == load_config(Toy)
    assert load_config(Toy, recipes / "small.yaml") == cfg  # a path works as well as a name
    # dotted keys in a recipe address the same fields
    (recipes / "dotted.yaml").write_text("inner.lr: 0.1\nn: 5\n")
    assert load_config(Toy, "dotted", recipes) == cfg


def test_unknown_keys_name_the_key_the_source_and_the_known_keys(recipes):
    with pytest.raises(ConfigError) as e:
        load_config(Toy, "typo", recipes)
    msg = str(e.value)
    assert "unknown Toy config key 'lrr'" in msg and str(recipes / "typo.yaml") in msg
    assert "known: cover, flag, inner, lr, mode, n, name, pair, path, sizes" in msg
    with pytest.raises(ConfigError, match=r"'inner\.lrr' in block 'inner' \(known: lr, on, steps\)") as e:
        load_config(Toy, "nested_typo", recipes)
    assert "nested_typo.yaml" in str(e.value)
    with pytest.raises(ConfigError, match=r"override -o nn=4: unknown Toy config key 'nn'"):
        load_config(Toy, overrides=["nn=4"])
    with pytest.raises(ConfigError, match=r"override inner.stepz=\[1\]: unknown Toy config key 'inner.stepz'"):
        load_config(Toy, overrides={"inner.stepz": [1]})
    with pytest.raises(ConfigError, match=r"flag --nn: unknown Toy config key 'nn'"):
        load_config(Toy, flags={"nn": 4})
    with pytest.raises(ConfigError, match=r"'n' is not a block of keys"):
        load_config(Toy, overrides=["n.x=1"])
    # a ConfigError is both a KeyError and a ValueError
    assert issubclass(ConfigError, KeyError) and issubclass(ConfigError, ValueError)
    with pytest.raises(FileNotFoundError, match=r"recipe 'nope' not found .*empty, nested_typo, small, typo"):
        load_config(Toy, "nope", recipes)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_recipe(recipes / "missing.yaml")


def test_values_are_checked_against_the_field_types():
    with pytest.raises(ConfigError, match=r"override -o n=abc: n='abc' is not a valid int"):
        load_config(Toy, overrides=["n=abc"])
    with pytest.raises(ConfigError, match=r"n=2.5 is not a valid int"):
        load_config(Toy, overrides=["n=2.5"])
    with pytest.raises(ConfigError, match=r"flag=.maybe. is not a valid bool"):
        load_config(Toy, overrides=["flag=maybe"])
    with pytest.raises(ConfigError, match=r"sizes\[1\]='x' is not a valid int"):
        load_config(Toy, overrides=["sizes=[1, x]"])
    with pytest.raises(ConfigError, match=r"sizes=3 is not a valid list\[int\]"):
        load_config(Toy, overrides=["sizes=3"])
    with pytest.raises(ConfigError, match=r"pair=\[1, 2, 3\]"):
        load_config(Toy, overrides=["pair=[1, 2, 3]"])
    with pytest.raises(ConfigError, match=r"inner is a block of keys \(lr, on, steps\), got 5"):
        load_config(Toy, overrides=["inner=5"])
    cfg = load_config(Toy, overrides=["lr=1", "inner.lr=1e-3", "path=2024", "cover=null", "pair=[3, 4]", "flag=off"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # an int where a float is expected is fine
    assert cfg.inner.lr == 0.001  # YAML 1.1 reads 1e-3 as a string; it is a float here
    assert cfg.path == "2024"  # a string field keeps the text, not the number YAML saw
    assert cfg.cover is None and cfg.pair == (3, 4) and cfg.flag is False


def test_nested_keys_and_block_mappings():
    cfg = load_config(Toy, overrides=["inner.lr=0.001", "inner.steps=[3, 7]"])
    assert cfg.inner == Inner(lr=0.001, steps=[3, 7])
    # a mapping for a block updates only the keys it names
    cfg = load_config(Toy, overrides=["inner.lr=0.2", "inner={steps: [3], on: true}"])
    assert cfg.inner == Inner(lr=0.2, steps=[3], on=True)
    assert load_config(Toy, overrides={"inner": Inner(lr=9.0)}).inner == Inner(lr=9.0)


def test_precedence_defaults_recipe_override_flag(recipes):
    assert load_config(Toy).n == 3
    assert load_config(Toy, "small", recipes).n == 5
    assert load_config(Toy, "small", recipes, ["n=6"]).n == 6
    assert load_config(Toy, "small", recipes, ["n=6"], {"n": 7}).n == 7
    # the same through argparse: every field a --field-name option, --recipe, -o
    p = argparse.ArgumentParser()
    add_config_options(p, Toy, choices={"mode": ("x", "y")})
    parse = lambda *a: config_from_args(Toy, p.parse_args(list(a)), recipes)
    assert parse() == Toy()
    assert parse("--recipe", "small", "-o", "n=6", "-o", "inner.lr=0.3") == Toy(n=6, inner=Inner(lr=0.3))
    got = parse("--recipe", "small", "-o", "n=6", "--n", "7", "--sizes", "[4, 5]", "--flag", "false")
    assert got == Toy(n=7, sizes=[4, 5], flag=False, inner=Inner(lr=0.1))
    assert parse("--mode", "y").mode == "y"
    for bad in (["--mode", "z"], ["--flag", "flase"], ["--n", "abc"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    with pytest.raises(SystemExit, match=r"error: flag --sizes: sizes='abc'"):  # a command ends with the message
        parse("--sizes", "abc")
    with pytest.raises(SystemExit, match=r"error: recipe 'nope' not found"):
        parse("--recipe", "nope")


def test_config_yaml_round_trip(tmp_path):
    cfg = Toy(name="run", n=9, lr=1e-6, sizes=[], pair=(5, 6), path=None, cover=None, inner=Inner(0.25, [10], True))
    path = write_config(cfg, tmp_path)
    assert path == tmp_path / "config.yaml" and path.read_text().startswith("# Toy run configuration")
    back = read_config(Toy, tmp_path)
    assert back == cfg and back.pair == (5, 6) and back.lr == 1e-6
    assert read_config(Toy, path) == cfg
    assert not (tmp_path / "config.yaml.tmp").exists()
    # a stored config with an unknown key is refused, naming the file; missing keys keep their defaults
    path.write_text(path.read_text() + "extra: 1\n")
    with pytest.raises(ConfigError, match=r"config .*config.yaml: unknown Toy config key 'extra'"):
        read_config(Toy, tmp_path)
    assert config_from_dict(Toy, {"n": 4}) == Toy(n=4)
