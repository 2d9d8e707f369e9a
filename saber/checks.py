"""Config range checks shared by the schema and the library's own config classes.

They raise ConfigError, whose message names the key, the value and what is expected.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value is out of range or inconsistent; the message names the key."""


def check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected {expected}")


def one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    check(value in allowed, key, value, "one of " + ", ".join(allowed))


def fraction(key: str, value: float, *, open_low: bool = False) -> None:
    ok = (0.0 < value <= 1.0) if open_low else (0.0 <= value <= 1.0)
    check(ok, key, value, "a number in " + ("(0, 1]" if open_low else "[0, 1]"))


def positive(key: str, value: float) -> None:
    check(value > 0, key, value, "a positive number")
