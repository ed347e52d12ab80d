"""A section nested with other defaults than its class's (``param(factory=...)``) keeps them for the keys a
config leaves out, at any depth; a section nested with its class's defaults behaves as before."""

from dataclasses import dataclass

import pytest

from pipeline.config import from_mapping, param
from pipeline.errors import ConfigError


@dataclass
class Leaf:
    """A leaf section."""

    a: int = param(1, "First value.", min=0)
    b: list[int] = param([1, 2], "Second value.")


@dataclass
class Middle:
    """A section holding a leaf."""

    leaf: Leaf = param(Leaf, "The leaf.")
    c: str = param("x", "Third value.")


@dataclass
class Root:
    """The root: the same sections nested twice, once with their own defaults and once with others."""

    plain: Middle = param(Middle, "Class defaults.")
    tuned: Middle = param(factory=lambda: Middle(leaf=Leaf(a=7, b=[9]), c="y"), doc="Other defaults.")


def test_missing_keys_of_a_tuned_section_keep_its_defaults_at_every_depth():
    cfg = from_mapping(Root, {"tuned": {"leaf": {"a": 3}}, "plain": {"leaf": {"a": 3}}})
    assert cfg.tuned == Middle(leaf=Leaf(a=3, b=[9]), c="y")
    assert cfg.plain == Middle(leaf=Leaf(a=3, b=[1, 2]), c="x")
    assert from_mapping(Root, {"tuned": {}}).tuned == Root().tuned


def test_defaults_are_not_shared_between_instances():
    one = from_mapping(Root, {"tuned": {"c": "z"}})
    one.tuned.leaf.b.append(5)
    assert Root().tuned.leaf.b == [9] and from_mapping(Root, {"tuned": {"c": "z"}}).tuned.leaf.b == [9]


def test_a_tuned_section_is_still_checked():
    with pytest.raises(ConfigError, match="'tuned.leaf.a'"):
        from_mapping(Root, {"tuned": {"leaf": {"a": -1}}})
    with pytest.raises(ConfigError, match="'tuned.leaf.d'"):
        from_mapping(Root, {"tuned": {"leaf": {"d": 1}}})
    with pytest.raises(ConfigError, match="expected a mapping"):
        from_mapping(Root, {"tuned": 3})
