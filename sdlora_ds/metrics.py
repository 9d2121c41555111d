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


# Up to this many tasks a matrix is shown cell by cell (text table, per-cell numbers in the images);
# above it the text keeps the first and last EDGE tasks and the images become heat maps without
# cell text (a 200 x 200 table of numbers is neither readable nor cheap to draw: issue 27).
CELL_TEXT_MAX_TASKS = 20
EDGE = 5


def ends(texts: list, most: int = 2 * EDGE) -> list:
    """`texts` if it has at most `most` items, else its first and last EDGE with a count between
    (per-task lists in log lines stay one line at any T)."""
    if len(texts) <= most:
        return list(texts)
    return texts[:EDGE] + [f"... ({len(texts) - 2 * EDGE} more) ..."] + texts[-EDGE:]


def task_ticks(T: int, most: int = 10) -> list:
    """Tick positions for T tasks on a heat map: every task up to `most`, else ~`most` round steps and the last."""
    if T <= most:
        return list(range(T))
    step = max(1, round(T / most / 5) * 5) if T >= 5 * most else max(1, T // most)
    ticks = list(range(0, T, step))
    return ticks + [T - 1] if T - 1 - ticks[-1] >= step / 2 else ticks[:-1] + [T - 1]


def format_matrix(acc: list, acc_all: list) -> str:
    """The matrix as text: one row per trained task, one column per evaluated task, then 'all'. Above
    CELL_TEXT_MAX_TASKS tasks, only the first and last EDGE rows and columns (a '...' between), so
    the table fits a screen at any T; every value is in results.json."""
    T = len(acc)
    shown = list(range(T)) if T <= CELL_TEXT_MAX_TASKS else list(range(EDGE)) + [None] + list(range(T - EDGE, T))
    head = "after\\on " + "".join(f"{'...':>7}" if j is None else f"{'T' + str(j):>7}" for j in shown) + f"{'all':>8}"
    rows = [head]
    for t in shown:
        if t is None:
            rows.append(f"{'...':>8}")
            continue
        row = acc[t]

        def cell(j):
            if j is None:  # the hidden middle columns: '...' where this row has values there
                return f"{'...':>7}" if len(row) > EDGE else " " * 7
            return f"{row[j]:7.2f}" if j < len(row) else " " * 7
        rows.append(f"{'T' + str(t):>8} {''.join(cell(j) for j in shown)}{acc_all[t]:8.2f}")
    return "\n".join(rows)
