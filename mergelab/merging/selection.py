"""The one rule that picks a setting from validation scores, wherever settings are picked.

The best score wins; among equal best scores the first listed. That is how the TALL
reference code scans its λ grid (github nik-dim/tall_masks, ``find_optimal_mask``: a
strict ``>`` over the grid in order) and how Task Arithmetic's λ is picked there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from mergelab.errors import BadValue

Setting = TypeVar("Setting")


def pick_best(settings: Iterable[Setting], score: Callable[[Setting], float]) -> Setting:
    """The setting with the highest ``score``; the first listed among equal best ones."""
    best, best_score = None, None
    for setting in settings:
        value = score(setting)
        if best_score is None or value > best_score:
            best, best_score = setting, value
    if best_score is None:
        raise BadValue("no settings to pick from")
    return best
