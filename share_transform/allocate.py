"""``allocate="weights"``: cut each stage's sharable layers into the runs that lose least, under a parameter budget.

The paper's perspective asks for "a flexible sharing rate, function of the position in the stage". Trained
weights say where the blocks of a stage already resemble each other. Within each candidate list (the sharable
layers of one stage with one signature, in compute order) the members are cut into consecutive runs of any
lengths; a run of one keeps its own weight, a longer run shares one (or, with ``templates=k``, a bank of k).

The cost of a run is its squared reconstruction error ``sum_j ||W_j - W_hat_j||^2`` with the run's least-squares
shared weight: the members' mean for hard sharing (``tr G - 1^T G 1 / L`` from the members' Gram matrix
``G``), the best rank-k approximation for soft sharing (the sum of the ``L - k`` smallest eigenvalues of ``G``).
Costs add over runs and lists, so the objective is the squared total reconstruction error over all the
candidates, whatever is shared; a layer weighs by its squared norm.

The search is exact:

* one list: a dynamic program over its cut points keeps, for every prefix of the members, the Pareto front of
  (parameters saved, error) over the partitions of that prefix (for hard sharing a run of ``L`` saves
  ``(L - 1) * numel``, so the front holds at most one point per number of runs; soft runs save
  ``L * numel - k * (numel + L)``, a front of at most one point per (members shared, runs) pair);
* across lists: the fronts are merged one list at a time (a multiple-choice knapsack), keeping the Pareto front
  of (parameters saved, capped at the budget's requirement, error) over the lists so far; a state that already
  meets the budget keeps only its least error, since every option saves >= 0.

Every Pareto-optimal combination survives each step, so the partition returned has the least total error among
all consecutive partitions that meet the budget (ties: the one that saves more). Cost: one Gram matrix per list
(one product over its weights) and ``O(n^2)`` front merges of at most ``O(n)`` (hard) or ``O(n^2)`` (soft)
points for a list of ``n``; the cross-list front holds at most one point per distinct saving below the
requirement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Allocation", "allocate_runs", "gram", "partition_error", "run_errors", "run_saving"]


def gram(weights: Sequence[torch.Tensor]) -> np.ndarray:
    """The members' Gram matrix ``G[a, b] = <W_a, W_b>`` in float64 (the product itself in float32 or wider)."""
    dtype = torch.promote_types(weights[0].dtype, torch.float32)
    rows = torch.stack([w.detach().reshape(-1).to(dtype) for w in weights])
    g = (rows @ rows.T).double().cpu().numpy()
    return (g + g.T) / 2


def run_errors(g: np.ndarray, templates: int | None) -> np.ndarray:
    """``E[i, j]``: squared reconstruction error of the run of members ``i..j-1`` (``j - i >= 2``); 0 elsewhere.

    Hard sharing (``templates=None``): the run's mean, ``sum_a G[a, a] - sum_ab G[a, b] / L``. Soft sharing with
    ``k`` templates: the best rank-k approximation, the sum of the ``L - k`` smallest eigenvalues of the run's
    Gram block (0 when ``L <= k``).
    """
    n = g.shape[0]
    errors = np.zeros((n + 1, n + 1))
    if templates is None:
        block = np.zeros((n + 1, n + 1))
        block[1:, 1:] = g.cumsum(0).cumsum(1)
        trace = np.concatenate([[0.0], np.cumsum(np.diag(g))])
        for length in range(2, n + 1):
            i = np.arange(n - length + 1)
            j = i + length
            total = block[j, j] - block[i, j] - block[j, i] + block[i, i]
            errors[i, j] = np.maximum(trace[j] - trace[i] - total / length, 0.0)
        return errors
    for length in range(templates + 1, n + 1):
        starts = np.arange(n - length + 1)
        blocks = np.stack([g[s : s + length, s : s + length] for s in starts])
        values = np.linalg.eigvalsh(blocks)  # ascending
        errors[starts, starts + length] = np.maximum(values[:, : length - templates].sum(axis=1), 0.0)
    return errors


def run_saving(length: int, numel: int, templates: int | None) -> int:
    """Parameters a run of ``length`` members saves against each owning its weight (a run of one: 0)."""
    if length < 2:
        return 0
    if templates is None:
        return (length - 1) * numel
    return length * numel - templates * (numel + length)


@dataclass(frozen=True)
class _Front:
    """Pareto points of one prefix: parameters saved, squared error, and where each came from."""

    saving: np.ndarray  # int64
    error: np.ndarray  # float64
    back: np.ndarray  # (points, 2) int64: (previous prefix or state, index of the point there)


def _prune(saving: np.ndarray, error: np.ndarray, back: np.ndarray, key: np.ndarray | None = None) -> _Front:
    """The points no other point beats: none saves at least as much (by ``key``, default ``saving``) with less
    error. Ties in key and error keep the point that saves more."""
    key = saving if key is None else key
    order = np.lexsort((-saving, error, -key))
    key, saving, error, back = key[order], saving[order], error[order], back[order]
    best = np.minimum.accumulate(np.concatenate([[np.inf], error[:-1]]))
    keep = error < best
    return _Front(saving[keep], error[keep], back[keep])


def _list_fronts(errors: np.ndarray, numel: int, templates: int | None) -> list[_Front]:
    """Pareto fronts of every prefix of one list (``fronts[j]``: partitions of members ``0..j-1``)."""
    n = errors.shape[0] - 1
    savings = [run_saving(length, numel, templates) for length in range(n + 1)]
    fronts = [_Front(np.zeros(1, np.int64), np.zeros(1), np.zeros((1, 2), np.int64))]
    for j in range(1, n + 1):
        parts_s, parts_e, parts_b = [], [], []
        for i in range(j):
            # i = j - 1: member j - 1 alone (cost 0, saving 0); else the run i..j-1 shares.
            f = fronts[i]
            parts_s.append(f.saving + savings[j - i])
            parts_e.append(f.error + errors[i, j])
            parts_b.append(np.stack([np.full(len(f.saving), i), np.arange(len(f.saving))], axis=1))
        fronts.append(_prune(np.concatenate(parts_s), np.concatenate(parts_e), np.concatenate(parts_b)))
    return fronts


def _runs(fronts: list[_Front], point: int) -> list[int]:
    """The run lengths, in order, of point ``point`` of the whole list's front."""
    lengths = []
    j = len(fronts) - 1
    while j > 0:
        i, point = (int(v) for v in fronts[j].back[point])
        lengths.append(j - i)
        j = i
    return lengths[::-1]


@dataclass(frozen=True)
class Allocation:
    """The runs chosen for each list, the parameters they save and their total squared error."""

    runs: tuple[tuple[int, ...], ...]  # per list, the run lengths in compute order
    saving: int
    squared_error: float


def allocate_runs(lists: Sequence[tuple[np.ndarray, int]], templates: int | None, required: int) -> Allocation | None:
    """The consecutive partition of every list that saves at least ``required`` parameters with the least total
    squared error; None when even the whole of every list sharing cannot save that much.

    Args:
        lists: per candidate list, ``(errors, numel)``: its run errors from :func:`run_errors` and the elements
            of one member's weight.
        templates: None for hard sharing, else the templates per group.
        required: parameters to save (>= 0).
    """
    per_list = [_list_fronts(errors, numel, templates) for errors, numel in lists]
    need = max(int(required), 0)
    states = _Front(np.zeros(1, np.int64), np.zeros(1), np.zeros((1, 2), np.int64))
    history = []
    for fronts in per_list:
        whole = fronts[-1]  # the list's options: partitions of all its members
        saving = (states.saving[:, None] + whole.saving[None, :]).reshape(-1)
        error = (states.error[:, None] + whole.error[None, :]).reshape(-1)
        back = np.stack(
            np.meshgrid(np.arange(len(states.saving)), np.arange(len(whole.saving)), indexing="ij"), axis=-1
        ).reshape(-1, 2)
        states = _prune(saving, error, back, key=np.minimum(saving, need))
        history.append(states)
    met = np.flatnonzero(states.saving >= need)
    if len(met) == 0:
        return None
    point = int(met[np.argmin(states.error[met])])
    saving, error = int(states.saving[point]), float(states.error[point])
    chosen = []
    for fronts, step in zip(reversed(per_list), reversed(history)):
        previous, option = (int(v) for v in step.back[point])
        chosen.append(tuple(_runs(fronts, option)))
        point = previous
    return Allocation(tuple(reversed(chosen)), saving, error)


def partition_error(g: np.ndarray, runs: Sequence[int], templates: int | None) -> float:
    """Squared reconstruction error of cutting a list (Gram ``g``) into ``runs`` (lengths in order)."""
    errors = run_errors(g, templates)
    total, start = 0.0, 0
    for length in runs:
        total += errors[start, start + length] if length > 1 else 0.0
        start += length
    return total
