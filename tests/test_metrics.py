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
