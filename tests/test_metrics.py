import pytest

from sdlora_ds import metrics as M

# Hand-computed example: 3 tasks.
ACC = [[90.0], [80.0, 70.0], [60.0, 65.0, 50.0]]
ALL = [90.0, 75.0, 58.0]


def test_avg_and_last():
    assert M.avg_acc(ALL) == pytest.approx((90 + 75 + 58) / 3)
    assert M.last_acc(ALL) == 58.0


def test_forgetting_uses_max_over_earlier_rows_in_task_order():
    # task 0: max(90, 80) - 60 = 30; task 1: max(70) - 65 = 5 -> mean 17.5
    assert M.forgetting(ACC) == pytest.approx(17.5)


def test_bwt():
    # (60 - 90) + (65 - 70) = -35 over 2 tasks
    assert M.backward_transfer(ACC) == pytest.approx(-17.5)


def test_more_than_ten_tasks_is_not_sorted_as_strings():
    # 12 tasks: task 10 and 11 must stay last; a string sort would put "10","11" after "1".
    T = 12
    acc = [[100.0 - t if j == t else 50.0 + j for j in range(t + 1)] for t in range(T)]
    drops = [max(acc[t][j] for t in range(j, T - 1)) - acc[T - 1][j] for j in range(T - 1)]
    assert M.forgetting(acc) == pytest.approx(sum(drops) / len(drops))
    assert M.forgetting(acc) == pytest.approx(sum((100.0 - j) - (50.0 + j) for j in range(T - 1)) / (T - 1))


def test_single_task_and_summary():
    assert M.forgetting([[70.0]]) == 0.0 and M.backward_transfer([[70.0]]) == 0.0
    s = M.summarize(ACC, ALL)
    assert s["last_acc"] == 58.0 and s["acc_matrix"] == ACC
    text = M.format_matrix(ACC, ALL)
    assert "58.00" in text and text.count("\n") == 3
    with pytest.raises(AssertionError):
        M.summarize([[1.0, 2.0]], [1.0])


def test_long_matrix_text_keeps_the_first_and_last_tasks():
    """Above CELL_TEXT_MAX_TASKS tasks the printed table stays one screen: the first and last EDGE
    rows and columns with a '...' between (issue 27: T = 200 would print 201 rows of 201 cells)."""
    T = 200
    acc = [[float(j) for j in range(t + 1)] for t in range(T)]
    text = M.format_matrix(acc, [float(t) for t in range(T)])
    lines = text.splitlines()
    assert len(lines) == 1 + 2 * M.EDGE + 1 and max(map(len, lines)) < 120
    assert lines[0].split()[1:] == ["T0", "T1", "T2", "T3", "T4", "...", "T195", "T196", "T197", "T198", "T199", "all"]
    assert lines[-1].split() == ["T199", "0.00", "1.00", "2.00", "3.00", "4.00", "...", "195.00", "196.00", "197.00",
                                 "198.00", "199.00", "199.00"]
    assert lines[1].split() == ["T0", "0.00", "0.00"]  # row 0: one value, then 'all'
    short = M.format_matrix(acc[:M.CELL_TEXT_MAX_TASKS], list(range(M.CELL_TEXT_MAX_TASKS)))
    assert "..." not in short and len(short.splitlines()) == M.CELL_TEXT_MAX_TASKS + 1


def test_task_ticks_stay_about_ten_and_end_at_the_last_task():
    assert M.task_ticks(7) == list(range(7))
    for T in (21, 57, 100, 200, 1000):
        ticks = M.task_ticks(T)
        assert ticks[0] == 0 and ticks[-1] == T - 1 and 8 <= len(ticks) <= 13 and ticks == sorted(set(ticks))


def test_ends_keeps_short_lists_and_cuts_long_ones_to_their_ends():
    assert M.ends(["a", "b"]) == ["a", "b"]
    assert M.ends([str(i) for i in range(10)]) == [str(i) for i in range(10)]
    cut = M.ends([str(i) for i in range(200)])
    assert cut == ["0", "1", "2", "3", "4", "... (190 more) ...", "195", "196", "197", "198", "199"]
    assert M.ends([str(i) for i in range(20)], M.CELL_TEXT_MAX_TASKS) == [str(i) for i in range(20)]
