"""What the fuzzers share: one random change to a decoded JSON value, and random JSON values."""

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


def random_json(rng: np.random.Generator, texts: Sequence[str], keys: Sequence[str], depth: int = 0) -> Any:
    """Any JSON value: scalars of every type (huge integers included) in lists and objects up to 3 deep,
    strings drawn from ``texts`` and object keys from ``keys``."""
    kind = rng.integers(8 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(2))
    if kind == 2:
        return float(rng.normal(0, 10.0 ** rng.integers(-5, 300)))
    if kind == 3:
        return int(rng.integers(-(2**62), 2**62)) * int(rng.choice([1, 2**8, 2**64]))
    if kind in (4, 5):
        return str(rng.choice(texts))
    if kind == 6:
        return [random_json(rng, texts, keys, depth + 1) for _ in range(rng.integers(0, 5))]
    return {str(rng.choice(keys)): random_json(rng, texts, keys, depth + 1) for _ in range(rng.integers(0, 5))}
