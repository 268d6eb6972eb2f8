"""``auto`` speculation: how many tokens to draft per step, and when to stop (and resume) drafting.

Cost model, in single decode steps: a verification of k drafts costs 1 + ROW_COST * k, and every
step of a speculating request pays SYNC_COST, drafts or not, because it cannot be built before
its input token is read (a request without speculation runs one step ahead). With a per-token
acceptance a (the request's own, accepted / (accepted + rejections) with one pseudo-count each)
a draft of k tokens yields (1 - a^(k+1)) / (1 - a) tokens; K maximises tokens per cost, no draft
is made while the best ratio is below 1.

Stopping: the request pauses speculation (its steps run ahead again, as without speculation)
when, after AUTO_WARMUP drafts, no K pays, or at once when its balance, the steps it saved
(accepted tokens) minus what it paid (drafted rows, speculating steps), falls below
-AUTO_BUDGET. So auto loses at most about AUTO_BUDGET steps per pause against no speculation,
also where no draft is ever found (open chat).

Resuming: while paused, the drafter keeps drafting in the shadow, for free, and its drafts are
checked against the tokens that arrive. When a shadow draft predicts REARM tokens in a row (the
answer has started copying: a code block, a quoted passage, a repeated list), speculation
resumes with fresh counters. The warm-up of a rewrite or a code edit ("Here is the code:") would
otherwise switch speculation off before the copy begins.
"""

from __future__ import annotations

# A verification of r rows costs about 1 + ROW_COST * (r - 1) single steps on the embedded model
# (benchmarks/spec_bench.py, verification_cost_vs_one_row, CPU time: 2 / 3 / 5 / 9 rows = 1.09 /
# 1.12 / 1.35 / 1.68 steps, ~0.085 per row); 0.12 also covers the verification's bookkeeping.
ROW_COST = 0.12
# A speculating step without drafts costs ~5% more than a run-ahead step (CPU time, 40-token chat
# answers, 8 interleaved pairs of a never-drafting speculator vs none: median +4.9%).
SYNC_COST = 0.05
AUTO_WARMUP = 4
AUTO_BUDGET = 0.5
REARM = 3


def expected_gain(acceptance: float, k: int, row_cost: float = ROW_COST) -> float:
    """Tokens per single-step cost of verifying k drafts accepted each with ``acceptance``."""
    tokens = float(k + 1) if acceptance >= 1.0 else (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return tokens / (1.0 + row_cost * k)


class AutoPolicy:
    """The per-request state of ``auto``: acceptance, balance, pause and shadow drafts."""

    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self.shadow: list[int] = []  # while paused: the drafter's prediction of what follows
        self._reset()

    def _reset(self) -> None:
        self.accepted = 0
        self.rejections = 0  # drafts not accepted in full (one rejected token each)
        self.drafts = 0
        self.balance = 0.0
        self._run = 0  # while paused: shadow-predicted tokens in a row

    def step_k(self) -> int:
        """Tokens to draft for the next step (0: none); books the step's SYNC_COST."""
        self._charge(SYNC_COST)
        return 0 if self.paused else self.best_k()

    def best_k(self) -> int:
        """The draft length with the best expected tokens per cost, 0 when none pays."""
        a = (self.accepted + 1) / (self.accepted + self.rejections + 2)
        gains = {k: expected_gain(a, k) for k in range(1, self.num_tokens + 1)}
        best = max(gains, key=gains.__getitem__)
        return best if gains[best] > 1.0 else 0

    def observe(self, drafted: int, accepted: int) -> None:
        self.drafts += 1
        self.accepted += accepted
        self.rejections += int(accepted < drafted)
        self._charge(ROW_COST * drafted - accepted)
        if self.drafts >= AUTO_WARMUP and self.best_k() == 0:
            self._pause()

    def follow(self, token: int) -> None:
        """While paused: check the shadow draft against the token that arrived; resume when
        it has predicted REARM tokens in a row."""
        if self.shadow and self.shadow[0] == token:
            self.shadow.pop(0)
            self._run += 1
            if self._run >= REARM:
                self.paused, self.shadow = False, []
                self.resumes += 1
                self._reset()
        else:
            self.shadow, self._run = [], 0

    def _charge(self, cost: float) -> None:
        self.balance -= cost
        if self.balance < -AUTO_BUDGET:
            self._pause()

    def _pause(self) -> None:
        if not self.paused:
            self.paused, self.shadow, self._run = True, [], 0
            self.pauses += 1
