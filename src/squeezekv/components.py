"""What policies and allocators share: frozen dataclasses of typed settings, registries by name, and
spec strings (``name:setting=value,...``) that name an instance.

A setting is a dataclass field typed ``int`` or ``float``. Values arrive from Python, NumPy, spec
strings and command lines, so :class:`Component` turns NumPy numbers into Python ones and refuses
anything else (``bool`` included) with one error naming the setting, before the subclass checks its
ranges in its own ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import typing
from typing import ClassVar, TypeVar

C = TypeVar("C", bound="Component")


@dataclasses.dataclass(frozen=True)
class Component:
    """A named policy or allocator and its settings. Subclasses are frozen dataclasses whose
    ``__post_init__`` calls this one first, then :meth:`require` for each range."""

    kind: ClassVar[str]  # "policy" or "allocator", for messages
    name: ClassVar[str]

    def __post_init__(self) -> None:
        for setting, kind in setting_types(type(self)).items():
            object.__setattr__(self, setting, coerce(self, setting, getattr(self, setting), kind))

    def require(self, holds: bool, setting: str, allowed: str) -> None:
        """Raises the one error for a setting out of range, naming its value and what is allowed."""
        if not holds:
            raise ValueError(
                f"{self.kind} {self.name!r}: {setting}={getattr(self, setting)!r} must be {allowed}"
            )

    def replace(self: C, **settings: int | float) -> C:
        """A copy with ``settings`` changed (and checked again)."""
        check_settings(type(self), settings)
        return dataclasses.replace(self, **settings)

    def settings(self) -> dict[str, int | float]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @property
    def spec(self) -> str:
        """The canonical spec string: the name, plus ``:k=v,...`` for settings off their default."""
        changed = [
            f"{field.name}={getattr(self, field.name)}"
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != field.default
        ]
        return ":".join([self.name, ",".join(changed)]) if changed else self.name

    def to_dict(self) -> dict:
        return {"name": self.name, **self.settings()}


@functools.cache
def setting_types(cls: type[Component]) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def coerce(owner: Component, setting: str, value: object, kind: type) -> int | float | str:
    """``value`` as a Python ``kind`` (``int``, ``float`` or ``str``); NumPy numbers are welcome,
    bools not."""
    if not isinstance(value, bool):
        if kind is int and isinstance(value, numbers.Integral):
            return int(value)
        if kind is float and isinstance(value, numbers.Real):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    raise ValueError(f"{owner.kind} {owner.name!r}: {setting}={value!r} must be {ALLOWED[kind]}")


ALLOWED = {int: "an integer", float: "a number", str: "a word"}


def check_settings(cls: type[Component], names: typing.Iterable[str]) -> None:
    """Refuses settings ``cls`` does not have, naming those it has."""
    known = setting_types(cls)
    unknown = [name for name in names if name not in known]
    if unknown:
        has = f"its settings: {', '.join(known)}" if known else "it has no settings"
        raise ValueError(f"{cls.kind} {cls.name!r} has no setting {unknown[0]!r}; {has}")


def resolve(spec: object, registry: dict[str, type[C]], base: type[C], settings: dict | None = None) -> C:
    """An instance of ``base`` from an instance, a registered name or ``name:setting=value,...``.

    ``settings`` (typed values, e.g. from flags) override the spec's for the fields its class has and
    are ignored otherwise, so a setting without a default (a file to read) can come from a flag."""
    if isinstance(spec, base):
        return spec
    kind = base.kind
    if not isinstance(spec, str):
        raise ValueError(
            f"{kind} must be a {base.__name__}, a name or 'name:setting=value,...', got {spec!r}"
        )
    name, _, listed = spec.partition(":")
    name = name.strip()
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(registry)}")
    cls = registry[name]
    texts = {}
    for item in (part.strip() for part in listed.split(",")):
        if not item:
            continue
        setting, equals, text = (part.strip() for part in item.partition("="))
        if not equals:
            raise ValueError(f"{kind} spec {spec!r}: {item!r} is not setting=value")
        texts[setting] = text
    check_settings(cls, texts)
    types = setting_types(cls)
    parsed = {setting: parse(cls, setting, text, types[setting]) for setting, text in texts.items()}
    given = {setting: value for setting, value in (settings or {}).items() if setting in types}
    return cls(**(parsed | given))


def parse(cls: type[Component], setting: str, text: str, kind: type) -> int | float | str:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{cls.kind} {cls.name!r}: {setting}={text!r} must be {ALLOWED[kind]}") from None
