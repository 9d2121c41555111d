"""Continual-learning metrics from the accuracy matrix.

acc[t][j] (percent) = accuracy on task j's classes after training task t, j <= t (row t has t+1
entries). acc_all[t] = accuracy over all classes seen after task t (sample-weighted: every test
sample counts once). Tasks are indexed in training order — never sorted as strings (a bug of one
reference: "100-119" sorted before "20-39").
"""
from __future__ import annotations


def avg_acc(acc_all: list) -> float:
    """Mean over tasks of the all-seen-classes accuracy."""
    return sum(acc_all) / len(acc_all)


def last_acc(acc_all: list) -> float:
    return acc_all[-1]


def forgetting(acc: list) -> float:
    """Mean over tasks j < T-1 of max_{j <= t < T-1} acc[t][j] - acc[T-1][j] (0 for one task)."""
    T = len(acc)
    if T < 2:
        return 0.0
    drops = [max(acc[t][j] for t in range(j, T - 1)) - acc[T - 1][j] for j in range(T - 1)]
    return sum(drops) / len(drops)


def backward_transfer(acc: list) -> float:
    """Mean over tasks j < T-1 of acc[T-1][j] - acc[j][j] (negative = forgetting; 0 for one task)."""
    T = len(acc)
    if T < 2:
        return 0.0
    return sum(acc[T - 1][j] - acc[j][j] for j in range(T - 1)) / (T - 1)


def summarize(acc: list, acc_all: list) -> dict:
    assert len(acc) == len(acc_all) and all(len(row) == t + 1 for t, row in enumerate(acc)), "ragged matrix"
    return {"acc_matrix": acc, "acc_all": acc_all, "avg_acc": avg_acc(acc_all), "last_acc": last_acc(acc_all),
            "forgetting": forgetting(acc), "bwt": backward_transfer(acc)}


def format_matrix(acc: list, acc_all: list) -> str:
    """The matrix as text: one row per trained task, one column per evaluated task, then 'all'."""
    T = len(acc)
    head = "after\\on " + "".join(f"{'T' + str(j):>7}" for j in range(T)) + f"{'all':>8}"
    rows = [head]
    for t, row in enumerate(acc):
        cells = "".join(f"{v:7.2f}" for v in row) + " " * 7 * (T - len(row))
        rows.append(f"{'T' + str(t):>8} {cells}{acc_all[t]:8.2f}")
    return "\n".join(rows)
