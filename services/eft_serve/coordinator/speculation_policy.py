"""Per stream: how many tokens the next decoding step drafts, 0 meaning a plain step.

Owns the rules that keep speculation from ever being (much) slower than plain decoding:

* The first step is always plain: its pool calls also prefill the prompt, so the first token
  arrives as soon as plain decoding's would (a draft + verify would make it wait for both). The
  second step is plain too when adapting: it measures what a plain step costs this stream.
* Cost model (adaptive). Measured per stream: seconds per plain step (p), per drafted token of a
  draft call (d) and per verify call (v), and the drafter's per-token agreement α (decayed over
  recent tokens: every verified drafted token, and in plain steps the drafter's own greedy
  choice, which a drafter of the recipe has already scored, compared with the chosen token).
  A block of k is expected to yield E(k) = 1 + α + … + α^k tokens in d·k + max(v, p) seconds (a
  verify call does at least a plain step's work). The best k must beat 1/p tokens per second,
  otherwise the stream decodes plainly.
* Block size: the smaller of that best k and a burst-aware size (start at 4, double after a fully
  kept block, shrink to what was kept + 1 after a rejection; cap ``max_draft_tokens``).
* Back-off: after a fall-back the stream stays plain for a while (4 steps, doubled each time
  speculation fails again right after resuming, up to 64; reset when a block passes), then
  resumes when the model says a block would win again — a drafter outside the recipe gets no
  free agreement signal, so it probes with one block when the wait is over.

With ``adaptive`` off the block is always ``max_draft_tokens`` (after the plain first step).
Knows nothing of pools, merges or how a block is verified; output never depends on it (every
choice here is a speed choice: coupled acceptance yields plain decoding's tokens for any k).
"""

from __future__ import annotations

from eft_serve.coordinator.validate import SpeculationPlan

# The first block drafts this many tokens when adapting (then grows or shrinks with acceptance).
_ADAPTIVE_START = 4
# Weight the agreement estimate keeps per observed token (~ the last 6-7 tokens decide), and its
# prior (α = 1/2 worth one token), so a few tokens move it but one unlucky token does not.
_TOKEN_DECAY = 0.85
_PRIOR_AGREE, _PRIOR_TOKENS = 0.5, 1.0
# Weight of the newest measurement in the seconds-per-call averages.
_COST_EMA = 0.3
# Plain steps after a fall-back before speculation may resume; doubled per quick relapse, capped.
_FIRST_BACKOFF = 4
_MAX_BACKOFF = 64


class SpeculationPolicy:
    """Decides each step's draft size from the stream's own measured costs (see module doc)."""

    def __init__(self, spec: SpeculationPlan) -> None:
        self._max = spec.max_draft_tokens
        self._adaptive = spec.adaptive
        self.size = min(_ADAPTIVE_START, self._max) if spec.adaptive else self._max
        self._steps = 0
        self._plain_s: float | None = None  # seconds per plain step (the prefill step excluded)
        self._draft_s: float | None = None  # seconds per drafted token of a draft call
        self._verify_s: float | None = None  # seconds per verify call
        self._agree = _PRIOR_AGREE  # decayed counts: drafted tokens that held ...
        self._tokens = _PRIOR_TOKENS  # ... of those observed
        self._wait = 0  # plain steps left before speculation may resume
        self._backoff = _FIRST_BACKOFF
        self._speculating = True  # False after a fall-back, until speculation resumes
        self._blocks_since_resume = 0
        self._blind = False  # the last plain step gave no agreement signal (a drafter outside the recipe)
        self.fallbacks = 0  # times the stream switched to plain decoding

    # ------------------------------------------------------------------ decisions
    def next_draft_size(self) -> int:
        """Tokens to draft for the next step; 0 = one plain step."""
        if self._steps == 0:
            return 0  # plain first step: it prefills every pool, and TTFT stays plain's
        if not self._adaptive:
            return self._max
        if self._plain_s is None or self._wait > 0:
            return 0  # measure what plain costs first / backing off
        if self._draft_s is None or self._verify_s is None:
            return self.size  # no block measured yet: one tells what drafting costs here
        best = self.best_block()
        if best == 0 and (self._speculating or not self._blind):
            return 0  # a drafter of the recipe resumes when its plain-step agreement says so
        return max(1, min(self.size, best))  # (a blind drafter probes once the wait is over)

    def best_block(self) -> int:
        """The k with the highest expected rate, or 0 when no k beats a plain step."""
        if self._plain_s is None or self._draft_s is None or self._verify_s is None:
            return self.size
        alpha = self.agreement
        best_k, best_rate = 0, 1.0 / self._plain_s
        # A verify call runs every pool of a plain step over more positions, so it never really
        # costs less than one; a cheaper measurement is timing noise (tiny or idle models) and must
        # not make a drafter that never agrees look like a win.
        verify_s = max(self._verify_s, self._plain_s)
        expected = 1.0
        for k in range(1, self._max + 1):
            expected += alpha**k
            rate = expected / (self._draft_s * k + verify_s)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    @property
    def agreement(self) -> float:
        """Estimated probability that the next drafted token holds."""
        return self._agree / self._tokens

    @property
    def plain_seconds(self) -> float | None:
        return self._plain_s

    # ------------------------------------------------------------------ measurements
    def record_plain(self, seconds: float, drafter_agreed: bool | None = None) -> None:
        """A plain step took `seconds`; `drafter_agreed`: the drafter's greedy choice was the token."""
        self._steps += 1
        self._blind = drafter_agreed is None
        if self._steps > 1:  # the first step also prefilled the prompt: not a plain step's cost
            self._plain_s = _ema(self._plain_s, seconds)
        if drafter_agreed is not None:
            self._observe(int(drafter_agreed), 1)
        if self._wait > 0:
            self._wait -= 1

    def record_block(self, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        self._steps += 1
        if not self._adaptive or drafted == 0:
            return
        if not self._speculating:  # resumed (or probing) after a fall-back
            self._speculating, self._blocks_since_resume = True, 0
        # The drafted tokens up to and including the first rejected one were each tested.
        self._observe(accepted, accepted + (1 if accepted < drafted else 0))
        self._draft_s = _ema(self._draft_s, draft_s / drafted)
        self._verify_s = _ema(self._verify_s, verify_s)
        # Everything kept: the drafter tracks the merged model here, reach further. A rejection:
        # draft about as far as it was right this time (at least one token).
        self.size = min(self._max, self.size * 2) if accepted == drafted else max(1, accepted + 1)
        self._blocks_since_resume += 1
        if self._plain_s is None:
            return
        if self.best_block() == 0:
            # Relapsing right after resuming: wait longer before the next try.
            quick = self.fallbacks > 0 and self._blocks_since_resume <= 1
            self._backoff = min(2 * self._backoff, _MAX_BACKOFF) if quick else _FIRST_BACKOFF
            self._wait = self._backoff
            self._speculating = False
            self.fallbacks += 1

    def _observe(self, agreed: int, tested: int) -> None:
        for i in range(tested):
            self._agree = _TOKEN_DECAY * self._agree + (1.0 if i < agreed else 0.0)
            self._tokens = _TOKEN_DECAY * self._tokens + 1.0


def _ema(old: float | None, new: float) -> float:
    new = max(new, 1e-9)
    return new if old is None else (1 - _COST_EMA) * old + _COST_EMA * new
