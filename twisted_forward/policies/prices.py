"""
What a model costs: the price table and the one lookup everyone uses.

The table (``prices.json`` in this package, or the file ``PRICES_FILE``
names) gives US dollars per million tokens: ``input``, ``output`` and
``cached_input`` (prompt tokens served from OpenAI's prompt cache).  A
model is found by its exact name, else by the longest name it extends with
``-`` (``gpt-4o-2024-08-06`` is priced as ``gpt-4o``, ``gpt-4o-mini-…`` as
``gpt-4o-mini``).  A model the table does not know is charged the fallback
price (``UNKNOWN_MODEL_PRICE``), and logged once.

The ledger prices usage with the same :class:`PriceTable` and
:func:`cost_usd`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Mapping, Optional

from twisted.logger import Logger

_log = Logger(namespace="twisted_forward.policies.prices")

#: Micro-dollars per dollar: quotas are counted in whole micro-dollars.
MICRO = 1_000_000


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    input: float
    output: float
    cached_input: float

    def cost(self, prompt: int, completion: int, cached: int = 0) -> float:
        """Dollars for a usage: ``cached`` is the part of ``prompt`` served
        from the prompt cache."""
        cached = max(0, min(cached, prompt))
        return (
            (prompt - cached) * self.input
            + cached * self.cached_input
            + completion * self.output
        ) / 1_000_000


def parse_price(value: str) -> Price:
    """``"input,output"`` or ``"input,output,cached_input"``, USD per 1M tokens."""
    parts = [p.strip() for p in value.split(",")]
    if len(parts) not in (2, 3):
        raise ValueError(f"{value!r} is not 'input,output' dollars per 1M tokens")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{value!r} is not 'input,output' dollars per 1M tokens") from None
    if not all(math.isfinite(n) and n >= 0 for n in numbers):
        raise ValueError(f"{value!r}: prices must be numbers >= 0")
    return Price(numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else numbers[0])


def _entry(model: str, row: Any) -> Price:
    if not isinstance(row, Mapping) or set(row) - {"input", "output", "cached_input"}:
        raise ValueError(f"{model}: must be an object of input, output, cached_input")
    try:
        values = {k: float(row[k]) for k in row}
    except (TypeError, ValueError):
        raise ValueError(f"{model}: prices must be numbers") from None
    if "input" not in values or not all(math.isfinite(v) and v >= 0 for v in values.values()):
        raise ValueError(f"{model}: needs an input price; prices must be >= 0")
    return Price(
        values["input"], values.get("output", 0.0), values.get("cached_input", values["input"])
    )


def load_prices(text: str) -> dict[str, Price]:
    """A price table from JSON: ``{"model": {"input": …, "output": …, "cached_input": …}}``
    (keys starting with ``_`` are comments)."""
    try:
        table = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(table, Mapping):
        raise ValueError("must be a JSON object of model -> prices")
    return {m: _entry(m, row) for m, row in table.items() if not m.startswith("_")}


def builtin_prices() -> dict[str, Price]:
    """The table shipped with the package."""
    return load_prices(files(__package__).joinpath("prices.json").read_text("utf-8"))


class PriceTable:
    """Prices by model, with a fallback for models it does not know."""

    def __init__(self, prices: Mapping[str, Price], fallback: Price) -> None:
        self._prices = dict(prices)
        self._by_length = sorted(self._prices, key=len, reverse=True)
        self.fallback = fallback
        self._found: dict[str, Optional[Price]] = {}
        self._logged: set[str] = set()

    @classmethod
    def load(cls, path: Optional[str], fallback: Price) -> "PriceTable":
        """The table in ``path``, or the built-in one when None.

        :raises ValueError: the file is not a valid table.
        """
        if path is None:
            return cls(builtin_prices(), fallback)
        with open(path, encoding="utf-8") as f:
            return cls(load_prices(f.read()), fallback)

    def known(self, model: str) -> Optional[Price]:
        """The price of ``model`` from the table, or None."""
        if model in self._found:
            return self._found[model]
        price = self._prices.get(model)
        if price is None:
            for name in self._by_length:
                if model.startswith(name + "-"):
                    price = self._prices[name]
                    break
        if len(self._found) < 10_000:
            self._found[model] = price
        return price

    def price(self, model: str) -> Price:
        """The price of ``model``; the fallback (logged once) if unknown."""
        price = self.known(model)
        if price is not None:
            return price
        if model not in self._logged and len(self._logged) < 10_000:
            self._logged.add(model)
            _log.warn(
                "no price for model {model}; charging the fallback price "
                "({input}/{output} USD per 1M tokens)",
                model=model[:100], input=self.fallback.input, output=self.fallback.output,
            )
        return self.fallback

    def cost_usd(self, model: str, prompt: int, completion: int, cached: int = 0) -> float:
        """Dollars for a usage of ``model``."""
        return self.price(model).cost(prompt, completion, cached)


def cost_usd(table: PriceTable, model: str, prompt: int, completion: int, cached: int = 0) -> float:
    """Dollars for ``prompt`` input tokens (``cached`` of them from the
    prompt cache) and ``completion`` output tokens of ``model``."""
    return table.cost_usd(model, prompt, completion, cached)
