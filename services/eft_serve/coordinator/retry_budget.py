"""A retry budget: retries may add at most a fixed fraction of the calls made, plus a reserve.

Owns the arithmetic only (a token bucket: every first attempt deposits `ratio` tokens, every
retry withdraws one; the bucket starts full and holds at most `reserve` tokens). Shared
by every request of one coordinator, so when a pool is down retries stop multiplying the load
once the budget is spent, while a lone failed call still gets its retry. Knows nothing of pools,
errors or clocks.
"""

from __future__ import annotations


class RetryBudget:
    def __init__(self, ratio: float, reserve: float = 10.0) -> None:
        if ratio < 0 or reserve < 0:
            raise ValueError("ratio and reserve must be >= 0")
        self.ratio = ratio
        # The bucket starts full and never holds more than the reserve: after an idle period a
        # burst of failures gets `reserve` retries, then `ratio` per call made.
        self.cap = max(reserve, 1.0) if ratio > 0 or reserve > 0 else 0.0
        self._tokens = self.cap
        self.retries = 0  # retries granted
        self.denied = 0  # retries refused for lack of budget

    def record_call(self) -> None:
        """A first attempt was made: it earns `ratio` of a retry."""
        self._tokens = min(self.cap, self._tokens + self.ratio)

    def try_retry(self) -> bool:
        """Take one retry from the budget; False (and counted) when it is spent."""
        if self._tokens >= 1.0 - 1e-9:  # ten deposits of 0.1 make a retry despite rounding
            self._tokens = max(0.0, self._tokens - 1.0)
            self.retries += 1
            return True
        self.denied += 1
        return False
