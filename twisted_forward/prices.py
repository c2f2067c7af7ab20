"""
What tokens cost: a small price table and the lookup the ledger (and the
policies' USD quotas) use.

Prices are US dollars per million tokens: ``input``, ``cached_input`` (the
part of the prompt the upstream served from its cache, already counted in
``prompt_tokens``) and ``output``.  A dated model name
(``gpt-4o-2024-08-06``) takes its family's price; otherwise the longest
known prefix wins (``gpt-4o-mini-audio`` is priced as ``gpt-4o-mini``).  An
unknown model costs 0.0, and :func:`known` says so.

This table is the ledger's stop-gap until the policies' price table lands;
both read through :func:`cost_usd`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    input: float
    cached_input: float
    output: float


#: List prices (OpenAI, standard tier) per million tokens.
PRICES: Mapping[str, Price] = {
    "gpt-5": Price(1.25, 0.125, 10.0),
    "gpt-5-mini": Price(0.25, 0.025, 2.0),
    "gpt-5-nano": Price(0.05, 0.005, 0.40),
    "gpt-4.1": Price(2.0, 0.50, 8.0),
    "gpt-4.1-mini": Price(0.40, 0.10, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.025, 0.40),
    "gpt-4o": Price(2.50, 1.25, 10.0),
    "gpt-4o-mini": Price(0.15, 0.075, 0.60),
    "gpt-4-turbo": Price(10.0, 10.0, 30.0),
    "gpt-4": Price(30.0, 30.0, 60.0),
    "gpt-3.5-turbo": Price(0.50, 0.50, 1.50),
    "o1": Price(15.0, 7.50, 60.0),
    "o1-mini": Price(1.10, 0.55, 4.40),
    "o3": Price(2.0, 0.50, 8.0),
    "o3-mini": Price(1.10, 0.55, 4.40),
    "o4-mini": Price(1.10, 0.275, 4.40),
    "text-embedding-3-small": Price(0.02, 0.02, 0.0),
    "text-embedding-3-large": Price(0.13, 0.13, 0.0),
    "text-embedding-ada-002": Price(0.10, 0.10, 0.0),
}

_DATED = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


def price_of(model: str, table: Mapping[str, Price] = PRICES) -> Optional[Price]:
    """The price of ``model``, None when the table does not know it."""
    if not model:
        return None
    name = model.lower()
    if name in table:
        return table[name]
    undated = _DATED.sub("", name)
    if undated in table:
        return table[undated]
    best = None
    for known_name in table:
        if name.startswith(known_name + "-") and (best is None or len(known_name) > len(best)):
            best = known_name
    return table[best] if best is not None else None


def known(model: str, table: Mapping[str, Price] = PRICES) -> bool:
    """Whether :func:`cost_usd` knows a price for ``model``."""
    return price_of(model, table) is not None


def cost_usd(
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    table: Mapping[str, Price] = PRICES,
) -> float:
    """What the tokens of one exchange cost, 0.0 for an unknown model."""
    price = price_of(model, table)
    if price is None:
        return 0.0
    cached = min(max(0, cached_tokens), max(0, prompt_tokens))
    return (
        (prompt_tokens - cached) * price.input
        + cached * price.cached_input
        + completion_tokens * price.output
    ) / 1_000_000
