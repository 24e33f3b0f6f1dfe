"""One random change to a decoded JSON value: the fuzzers' near-valid requests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def mutated(
    rng: np.random.Generator, value: Any, nasty_value: Callable[[np.random.Generator], Any], extra_keys: Sequence[str]
) -> Any:
    """``value`` with one change at a random place in its tree: a key or element dropped, added or replaced.

    Replacements and additions come from ``nasty_value``; added keys from ``extra_keys``.
    """
    if isinstance(value, dict) and value and rng.integers(4):
        key = sorted(value)[rng.integers(len(value))]
        return {**value, key: mutated(rng, value[key], nasty_value, extra_keys)}
    if isinstance(value, list) and value and rng.integers(4):
        index = int(rng.integers(len(value)))
        return [*value[:index], mutated(rng, value[index], nasty_value, extra_keys), *value[index + 1 :]]
    change = rng.integers(3) if isinstance(value, (dict, list)) and value else 2
    if isinstance(value, dict) and change == 0:
        key = sorted(value)[rng.integers(len(value))]
        return {k: v for k, v in value.items() if k != key}
    if isinstance(value, dict) and change == 1:
        return {**value, extra_keys[int(rng.integers(len(extra_keys)))]: nasty_value(rng)}
    if isinstance(value, list) and change == 0:
        index = int(rng.integers(len(value)))
        return value[:index] + value[index + 1 :]
    if isinstance(value, list) and change == 1:
        return [*value, value[-1] if rng.integers(2) else nasty_value(rng)]
    return nasty_value(rng)
