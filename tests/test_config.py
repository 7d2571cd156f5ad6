"""The typed config system: strict types, unknown keys, overrides, errors naming the field."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from vlkit.config import ConfigError, apply_overrides, from_dict, load_config, replace, to_dict


@dataclass
class Inner:
    size: int = 32  # image size
    patch: int = 4  # patch size
    name: Literal["a", "b"] = "a"  # a choice

    def __post_init__(self):
        if self.size % self.patch:
            raise ConfigError("size", f"{self.size} is not divisible by patch {self.patch}")


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)  # nested component
    lr: float = 1e-3  # learning rate
    tags: list[str] = field(default_factory=list)  # free tags
    limit: Optional[int] = None  # optional int
    pair: tuple[int, int] = (1, 2)  # fixed-length tuple


def test_defaults_and_round_trip():
    cfg = from_dict(Outer, {})
    assert cfg == Outer()
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_unknown_key_names_dotted_path():
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, {"inner": {"sise": 3}})
    assert e.value.field == "inner.sise"
    assert "size" in str(e.value)  # lists the valid keys


@pytest.mark.parametrize("data, field_name", [
    ({"lr": "fast"}, "lr"),
    ({"inner": {"size": 3.5}}, "inner.size"),
    ({"inner": {"size": True}}, "inner.size"),
    ({"inner": {"name": "c"}}, "inner.name"),
    ({"tags": "x"}, "tags"),
    ({"tags": [1]}, "tags[0]"),
    ({"limit": "many"}, "limit"),
    ({"pair": [1, 2, 3]}, "pair"),
])
def test_wrong_types_name_the_field(data, field_name):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data)
    assert e.value.field == field_name


def test_post_init_error_is_prefixed_with_path():
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, {"inner": {"size": 30}})
    assert e.value.field == "inner.size"
    assert "divisible" in str(e.value)


def test_overrides_parse_yaml_values(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("inner:\n  size: 64\nlr: 1e-3\n")
    cfg = load_config(Outer, recipe, ["inner.patch=8", "lr=0.5", "tags=[x, y]", "limit=null", "pair=[3, 4]"])
    assert cfg.inner == Inner(size=64, patch=8)
    assert cfg.lr == 0.5 and cfg.tags == ["x", "y"] and cfg.limit is None and cfg.pair == (3, 4)


def test_override_errors():
    with pytest.raises(ConfigError):
        apply_overrides({}, ["no_equals_sign"])
    with pytest.raises(ConfigError) as e:
        apply_overrides({"lr": 1.0}, ["lr.x=3"])
    assert e.value.field == "lr"


def test_replace_returns_new_validated_config():
    cfg = Outer()
    new = replace(cfg, lr=0.1)
    assert new.lr == 0.1 and cfg.lr == 1e-3
    with pytest.raises(ConfigError):
        replace(cfg, inner={"size": 30})


@dataclass
class Tuned:
    inner: Inner = field(default_factory=lambda: Inner(size=48, patch=8, name="b"))  # not the class defaults


def test_a_partly_given_section_starts_from_the_fields_own_default():
    cfg = from_dict(Tuned, {"inner": {"patch": 6}})
    assert cfg.inner == Inner(size=48, patch=6, name="b")
    with pytest.raises(ConfigError, match="inner.size"):
        from_dict(Tuned, {"inner": {"patch": 5}})  # 48 % 5: checked on the merged section
