"""Choosing a rank per module for a parameter budget, from losses measured on one trained dynamic-rank adapter.

Nothing is trained: the search measures the loss of allocations (a rank per module) on search data
and works in rounds around a reference allocation, first the largest uniform rank within the budget:

1. Sensitivity: for each module, the loss with that module alone one candidate rank lower and one
   higher, every other module at its reference rank: about 2·M allocations for M modules, several
   per forward pass (each allocation gets one chunk of a repeated batch: `multirank.allocation_losses`).
2. Knapsack: assuming the loss changes of different modules add up, choose a rank per module among
   those three that minimizes the summed change within the budget: an exact multiple-choice knapsack
   by dynamic programming over parameter counts. Changes do not quite add up (layers feed each
   other), so the knapsack is also solved with a penalty per changed module, which keeps only the
   clearest gains: a few steps of decreasing length, measured together.
3. The best allocation measured so far within the budget becomes the next reference; when it stays
   the same, or after `rounds` rounds, the search stops. A module moves at most one candidate rank
   per round, so the additive model is only ever used near where it was measured.

The result is the measured allocation with the lowest loss within the budget, so on the search data
it is never worse than the uniform rank it starts from. `smallest_within` bisects the budget for the
fewest parameters whose loss is within a tolerance of a target.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from qdylora_cli.allocation import Allocation, ModuleShape, allocation_params, uniform

log = logging.getLogger(__name__)

MAX_UNITS = 100_000  # cost resolution of the knapsack: its error is under one unit per module
BISECTION_STEPS = 6  # tolerance mode: budget resolution 1/64 of the range searched
# Penalties per changed module of the shorter steps tried each round, as quantiles of the measured loss
# changes (besides penalty 0, the knapsack's full step): the larger, the fewer and clearer the moves kept.
STEP_QUANTILES = (0.25, 0.5, 0.75, 0.9)


class MeasuredLosses:
    """Losses of allocations on the search data, each allocation measured once; new ones in one batched call."""

    def __init__(self, shapes: Sequence[ModuleShape], measure: Callable[[list[Allocation]], list[float]]) -> None:
        self.names = [s.name for s in shapes]
        self._measure = measure
        self._known: dict[tuple[int, ...], float] = {}

    def key(self, allocation: Allocation) -> tuple[int, ...]:
        return tuple(allocation[n] for n in self.names)

    def __call__(self, allocations: Sequence[Allocation]) -> list[float]:
        new = list(dict.fromkeys(k for k in map(self.key, allocations) if k not in self._known))
        if new:
            for k, loss in zip(new, self._measure([dict(zip(self.names, k)) for k in new]), strict=True):
                self._known[k] = loss
        return [self._known[self.key(a)] for a in allocations]

    def __len__(self) -> int:
        return len(self._known)

    def best_within(self, shapes: Sequence[ModuleShape], capacity: int) -> tuple[Allocation, float]:
        """The measured allocation with the lowest loss (then fewest parameters) within `capacity`, adapters on."""
        fits = []
        for k, loss in self._known.items():
            params = allocation_params(shapes, dict(zip(self.names, k)))
            if any(k) and params <= capacity:
                fits.append((loss, params, k))
        loss, _, k = min(fits)
        return dict(zip(self.names, k)), loss


def knapsack(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], capacity: int) -> list[int] | None:
    """One option per group (an index into `costs[m]`) with the least total value and total cost <= capacity.

    Exact dynamic programming on costs in units of their greatest common divisor; when that needs
    more than MAX_UNITS units, costs are rounded *up* to coarser units, so the capacity still holds.
    Ties go to the first option (callers list cheaper ones first). None when nothing fits.
    """
    unit = math.gcd(*(c for cs in costs for c in cs if c > 0)) or 1
    if capacity // unit > MAX_UNITS:
        unit = -(-capacity // MAX_UNITS)
    cap = capacity // unit
    units = [[-(-c // unit) for c in cs] for cs in costs]
    best = np.zeros(cap + 1)  # best[u]: least total value of the groups so far with total cost <= u units
    picks = np.zeros((len(costs), cap + 1), dtype=np.int16)
    for m, (us, vs) in enumerate(zip(units, values, strict=True)):
        options = np.full((len(us), cap + 1), np.inf)
        for j, (u, v) in enumerate(zip(us, vs, strict=True)):
            if u <= cap:
                options[j, u:] = best[: cap + 1 - u] + v
        picks[m] = options.argmin(axis=0)
        best = options.min(axis=0)
    if not np.isfinite(best[cap]):
        return None
    chosen, u = [], cap
    for m in reversed(range(len(costs))):
        j = int(picks[m, u])
        chosen.append(j)
        u -= units[m][j]
    return chosen[::-1]


@dataclass
class Round:
    """One round of the search, for the record: where it started, what the additive model predicted, what it got."""

    reference_params: int
    reference_loss: float
    measured: int  # allocations measured in this round (repeats are not measured again)
    chosen_params: int  # the best of the round's knapsack steps
    predicted_loss: float  # its reference loss + summed loss changes
    chosen_loss: float


@dataclass
class SearchResult:
    allocation: Allocation
    params: int
    loss: float  # on the search data
    capacity: int
    start_rank: int  # the uniform rank the search started from
    rounds: list[Round] = field(default_factory=list)
    sensitivity: dict[str, dict[int, float]] = field(default_factory=dict)  # last round: module -> rank -> loss change


def start_rank(shapes: Sequence[ModuleShape], capacity: int, r_max: int) -> int:
    """The largest uniform rank (any of 1..r_max) within `capacity`; callers make sure that rank 1 fits."""
    return max(b for b in range(1, r_max + 1) if allocation_params(shapes, uniform(shapes, b)) <= capacity)


def neighbours(candidates: Sequence[int], rank: int) -> list[int]:
    """`rank` and the candidate ranks just below and just above it: where one round may move a module."""
    ranks = sorted({*candidates, rank})
    i = ranks.index(rank)
    return ranks[max(i - 1, 0) : i + 2]


def step_candidates(
    shapes: Sequence[ModuleShape],
    options: dict[str, list[int]],
    reference: Allocation,
    table: dict[str, dict[int, float]],
    capacity: int,
) -> list[Allocation]:
    """Knapsack solutions with a penalty on each module they change: none (the whole step the additive
    model asks for), then the STEP_QUANTILES of the measured loss changes (only the clearest gains)."""
    changes = np.array([abs(v) for row in table.values() for v in row.values() if v != 0.0])
    penalties = [0.0, *(float(np.quantile(changes, q)) for q in STEP_QUANTILES if changes.size)]
    steps: list[Allocation] = []
    for penalty in penalties:
        picks = knapsack([[s.params(g) for g in options[s.name]] for s in shapes],
                         [[table[s.name][g] + (penalty if g != reference[s.name] else 0.0) for g in options[s.name]]
                          for s in shapes], capacity)
        # None only when the knapsack's rounded-up costs miss a reference that fits exactly: no step then
        step = dict(reference) if picks is None else {s.name: options[s.name][j] for s, j in zip(shapes, picks, strict=True)}
        if step not in steps:
            steps.append(step)
    return steps


def search(
    shapes: Sequence[ModuleShape],
    candidates: Sequence[int],
    capacity: int,
    losses: MeasuredLosses,
    *,
    r_max: int,
    rounds: int,
) -> SearchResult:
    """The allocation with the lowest measured loss within `capacity` parameters (see the module docstring)."""
    shapes = list(shapes)
    first = start_rank(shapes, capacity, r_max)
    reference = uniform(shapes, first)
    result = SearchResult(reference, allocation_params(shapes, reference), losses([reference])[0], capacity, first)
    for _ in range(rounds):
        before = len(losses)
        reference_loss = losses([reference])[0]
        options = {s.name: neighbours(candidates, reference[s.name]) for s in shapes}
        moves = [(s.name, g) for s in shapes for g in options[s.name] if g != reference[s.name]]
        moved = losses([{**reference, name: g} for name, g in moves])
        table = {s.name: {reference[s.name]: 0.0} for s in shapes}
        for (name, g), loss in zip(moves, moved, strict=True):
            table[name][g] = loss - reference_loss
        steps = step_candidates(shapes, options, reference, table, capacity)
        step_losses = losses(steps)
        chosen, chosen_loss = min(zip(steps, step_losses), key=lambda t: t[1])
        result.rounds.append(Round(
            allocation_params(shapes, reference), reference_loss, len(losses) - before, allocation_params(shapes, chosen),
            reference_loss + sum(table[name][g] for name, g in chosen.items()), chosen_loss,
        ))
        last = result.rounds[-1]
        log.info("budget %s, round %d: %d allocations measured; best step: %s parameters, loss %.4f (predicted "
                 "%.4f, reference %.4f)", f"{capacity:,}", len(result.rounds), last.measured,
                 f"{last.chosen_params:,}", chosen_loss, last.predicted_loss, reference_loss)
        result.sensitivity = {name: dict(sorted(row.items())) for name, row in table.items()}
        best, _ = losses.best_within(shapes, capacity)
        if best == reference:
            break
        reference = best
    result.allocation, result.loss = losses.best_within(shapes, capacity)
    result.params = allocation_params(shapes, result.allocation)
    return result


@dataclass
class Bisection:
    """Tolerance mode: each budget tried and the loss its search reached."""

    target_loss: float
    tried: list[tuple[int, int, float]] = field(default_factory=list)  # (capacity, params, loss)


def smallest_within(
    shapes: Sequence[ModuleShape],
    candidates: Sequence[int],
    target_loss: float,
    low: int,
    high: int,
    losses: MeasuredLosses,
    *,
    r_max: int,
    rounds: int,
) -> tuple[SearchResult, Bisection]:
    """The search result with the fewest parameters whose loss is <= target_loss, bisecting the budget in [low, high].

    `high` must be feasible (the uniform rank that meets the target fits it); searches at nearby budgets
    share their measurements through `losses`.
    """
    record = Bisection(target_loss)

    def attempt(capacity: int) -> SearchResult:
        result = search(shapes, candidates, capacity, losses, r_max=r_max, rounds=rounds)
        record.tried.append((capacity, result.params, result.loss))
        return result

    best = attempt(high)
    if low >= high:  # the uniform rank that meets the target is below every candidate rank: nothing in between
        return best, record
    lowest = attempt(low)
    if lowest.loss <= target_loss:
        return lowest, record
    for _ in range(BISECTION_STEPS):
        if high - low <= 1:
            break
        middle = (low + high) // 2
        result = attempt(middle)
        if result.loss <= target_loss:
            best, high = result, result.params
        else:
            low = middle
    return best, record
