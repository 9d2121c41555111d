"""The metrics logger: TensorBoard put back to a checkpoint's event count (a kill mid-write, a swap
interrupted between its renames), fresh starts, hparams in the run's own event file, and the
accuracy-matrix image (read back from TensorBoard). The trainer-level kill-and-resume equality is in
test_checkpoint.py."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from sdlora_ds import metrics as M
from sdlora_ds.logger import (REBUILT, MetricLogger, event_files, raw_events, read_back, render_matrix,
                              restore_tensorboard)


def log_points(run_dir, resume, points):
    log = MetricLogger(str(run_dir), enabled=True, resume=resume)
    for tag, value, step in points:
        log.scalar(tag, value, step)
    log.flush()
    return log


def test_resume_keeps_exactly_the_checkpoints_events_and_bytes(tmp_path):
    """Scalars on two step axes (steps and task index): a resume from a position taken after 3
    points keeps those 3 and nothing else, whatever the step numbers of the dropped ones."""
    first = [("train/loss", 1.0, 1), ("train/loss", 0.9, 2), ("eval/acc", 50.0, 0)]
    after = [("train/loss", 0.8, 3), ("eval/acc", 60.0, 1)]  # eval at step 1 < purge step: purge_step keeps it
    log = log_points(tmp_path, None, first)
    pos = log.position()
    for p in after:
        log.scalar(*p)
    log.close()
    log = log_points(tmp_path, pos, after)  # the resumed run logs the same points again
    log.close()
    got = read_back(str(tmp_path / "tensorboard"))
    assert got["scalars"] == {"train/loss": [(1, 1.0), (2, pytest.approx(0.9)), (3, pytest.approx(0.8))],
                              "eval/acc": [(0, 50.0), (1, 60.0)]}
    assert [t for t, _ in got["tags"]] == ["train/loss", "train/loss", "eval/acc", "train/loss", "eval/acc"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5
    # a rebuilt file (sorted first) + this session's file
    names = [os.path.basename(p) for p in event_files(str(tmp_path / "tensorboard"))]
    assert len(names) == 2 and names[0] == REBUILT


def test_a_record_cut_by_a_kill_and_a_fresh_start(tmp_path):
    log = log_points(tmp_path, None, [("a", 1.0, 1), ("a", 2.0, 2)])
    pos = log.position()
    log.scalar("a", 3.0, 3)
    log.close()
    path = event_files(str(tmp_path / "tensorboard"))[0]
    with open(path, "r+b") as f:  # the last record half-written
        f.truncate(os.path.getsize(path) - 7)
    log = log_points(tmp_path, pos, [("a", 3.5, 3)])
    log.close()
    assert read_back(str(tmp_path / "tensorboard"))["scalars"]["a"] == [(1, 1.0), (2, 2.0), (3, 3.5)]
    log = MetricLogger(str(tmp_path), enabled=True, resume=None)  # a fresh start: nothing of the above
    assert any("fresh start" in n for n in log.notes)
    log.scalar("b", 1.0, 0)
    log.close()
    got = read_back(str(tmp_path / "tensorboard"))
    assert got["scalars"] == {"b": [(0, 1.0)]}
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


@pytest.mark.parametrize("killed", ["before the swap", "between the renames"])
def test_an_interrupted_swap_is_repaired(tmp_path, killed):
    tb = str(tmp_path / "tensorboard")
    log = log_points(tmp_path, None, [("a", float(i), i) for i in range(5)])
    log.close()
    if killed == "before the swap":  # a half-written .new: the old folder is still the truth
        os.makedirs(tb + ".new")
        open(os.path.join(tb + ".new", REBUILT), "wb").write(b"\0" * 10)
    else:  # tensorboard -> .old done, .new -> tensorboard not yet: .new was complete
        notes = []
        os.rename(tb, tb + ".keep")
        os.makedirs(tb)
        for name in os.listdir(tb + ".keep"):
            os.rename(os.path.join(tb + ".keep", name), os.path.join(tb, name))
        assert restore_tensorboard(tb, 3, notes) == 3  # builds the 3-event folder...
        os.rename(tb, tb + ".new")                      # ...and pretend the kill came mid-swap
        os.rename(tb + ".keep", tb + ".old")
    got = restore_tensorboard(tb, 3, [])
    assert got == 3 and not os.path.exists(tb + ".new") and not os.path.exists(tb + ".old")
    assert [d for d, header in raw_events(tb) if not header].__len__() == 3


def test_hparams_live_in_the_runs_own_event_file(tmp_path):
    log = MetricLogger(str(tmp_path), enabled=True)
    log.scalar("final/avg_acc", 70.0, 1)
    log.hparams({"optim.lr": 0.05, "name": "x", "list": [1, 2]}, {"avg_acc": 70.0}, 1)
    assert log.position()["tb_events"] == 1 + 3 + 1
    log.close()
    assert len(event_files(str(tmp_path / "tensorboard"))) == 1  # no second writer, no subfolder
    assert os.listdir(tmp_path / "tensorboard") == [os.path.basename(event_files(str(tmp_path / "tensorboard"))[0])]
    tags = [t for t, _ in read_back(str(tmp_path / "tensorboard"))["tags"]]
    assert tags == ["final/avg_acc", "_hparams_/experiment", "_hparams_/session_start_info",
                    "_hparams_/session_end_info", "hparam/avg_acc"]


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricLogger(str(tmp_path), enabled=False)
    log.scalar("a", 1.0, 0)
    log.acc_matrix([[1.0]], [1.0], 0)
    log.close()
    assert os.listdir(tmp_path) == [] and log.position() == {"tb_events": 0, "jsonl_bytes": 0}


# ---------------------------------------------------------------------- the matrix image
ACC = [[98.6], [89.0, 95.8], [39.7, 94.4, 97.2], [34.2, 94.4, 97.2, 5.0]]
ALL = [98.6, 92.4, 77.0, 57.7]


def test_matrix_image_read_back_from_tensorboard(tmp_path):
    """Labels (rows 'after task t', columns 'task j' and 'all seen'), title, colour bar: the margins
    around the cells carry dark text; a low cell is red, a high one green."""
    log = MetricLogger(str(tmp_path), enabled=True)
    log.acc_matrix(ACC, ALL, 3)
    log.close()
    (step, w, h, png), = read_back(str(tmp_path / "tensorboard"))["images"]["eval/acc_matrix"]
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert step == 3 and img.shape == (h, w, 3) and w >= 400 and h >= 250
    assert (img == render_matrix(ACC, ALL)).all()
    dark = img.sum(axis=2) < 200  # text and frame pixels
    # row labels in the left margin, column labels at the bottom, the title at the top
    assert dark[:, : w // 8].sum() > 200, "row labels"
    assert dark[-h // 10:, :].sum() > 200, "column labels"
    assert dark[: h // 12, w // 4: 3 * w // 4].sum() > 100, "title"
    # the colour bar at the right: a column of pixels running from red (bottom) to green (top)
    strip = img[h // 5: 4 * h // 5, int(0.86 * w): int(0.88 * w)]
    r, g = strip[..., 0].mean(axis=1), strip[..., 1].mean(axis=1)
    assert g[0] > r[0] and r[-1] > g[-1], "colour bar: green at 100, red at 0"
    # red for the 5 % cell (bottom row, 4th task column), green for the 98.6 % cell (top left)
    reds = (img[..., 0] > 150) & (img[..., 1] < 60) & (img[..., 2] < 60)
    greens = (img[..., 1] > 100) & (img[..., 0] < 60)
    assert reds.sum() > 500 and greens.sum() > 500


def test_matrix_image_of_one_and_many_tasks():
    one = render_matrix([[70.0]], [70.0])
    many = render_matrix([[50.0 + j for j in range(t + 1)] for t in range(20)], [60.0] * 20)
    assert one.dtype == np.uint8 and one.shape[2] == 3
    assert many.shape[0] > one.shape[0] and many.shape[1] > one.shape[1]
    assert (render_matrix([[70.0]], [70.0]) == one).all()  # deterministic (logged images compare equal)


def test_matrix_image_of_hundreds_of_tasks_is_a_fixed_size_heat_map():
    """Above metrics.CELL_TEXT_MAX_TASKS tasks: no per-cell text, one fixed size whatever T (the
    per-cell image of T = 200 would be ~12600 x 10000 px, and matplotlib refuses 2^16 px past
    T ~ 1000), the all-seen column still visible at the right of the separator."""
    def matrix(T):
        return [[100.0 * (j % 2) for j in range(t + 1)] for t in range(T)], [20.0] * T
    last_cells = render_matrix(*matrix(M.CELL_TEXT_MAX_TASKS))
    small, big = render_matrix(*matrix(M.CELL_TEXT_MAX_TASKS + 1)), render_matrix(*matrix(200))
    assert small.shape == big.shape == (800, 1000, 3)
    assert last_cells.shape[0] > small.shape[0] and last_cells.shape[1] > small.shape[1]
    # a cell-text image has dark digits inside the cells; the heat map's cell area is colour only
    # (alternating 0 / 100 % columns: red and green stripes)
    h, w, _ = big.shape
    area = big[h // 4: 3 * h // 4, w // 3: w // 2].astype(int)
    assert (area.sum(axis=2) < 150).sum() == 0
    reds = (area[..., 0] > 150) & (area[..., 1] < 60)
    greens = (area[..., 1] > 90) & (area[..., 0] < 60)
    assert reds.sum() > 1000 and greens.sum() > 1000
    # the all-seen column (20 %: orange-red) left of the colour bar
    strip = big[h // 3: 2 * h // 3, int(0.84 * w): int(0.86 * w)].astype(int)
    assert (strip[..., 0] > 200).mean() > 0.9 and (strip[..., 1] < 140).mean() > 0.9
