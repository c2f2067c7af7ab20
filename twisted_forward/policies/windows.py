"""
Where windows start and end: pure arithmetic, the same in every process.

Fixed windows are aligned to the epoch (a minute window starts on the
minute, UTC), so every process and instance counts into the same window
without asking anyone.  Quotas use calendar periods in UTC.
"""

from __future__ import annotations

import calendar
import time

DAY = 86400.0


def fixed_window(now: float, seconds: float) -> tuple[float, float]:
    """``(start, length)`` of the epoch-aligned window of ``seconds`` holding ``now``."""
    start = (now // seconds) * seconds
    return start, seconds


def day_window(now: float) -> tuple[float, float]:
    """``(start, length)`` of the UTC day holding ``now``."""
    return fixed_window(now, DAY)


def month_window(now: float) -> tuple[float, float]:
    """``(start, length)`` of the UTC calendar month holding ``now``."""
    t = time.gmtime(now)
    start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    end = calendar.timegm((year, month, 1, 0, 0, 0))
    return float(start), float(end - start)
