"""Progress in a log is a few plain lines with their figures; on a terminal, a tqdm bar."""

import io

from pipeline.finetune import _epoch_line
from pipeline.progress import Progress, note, tracked


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_long_loop_in_a_log_is_a_handful_of_lines_with_its_figures():
    log = io.StringIO()
    with Progress(2624, "decode lite0", "img", stream=log) as bar:
        for i in range(2624):
            bar.update(loss=f"{1 / (i + 1):.3f}")
    lines = log.getvalue().splitlines()
    assert 2 <= len(lines) <= 11, lines
    assert "\r" not in log.getvalue()
    assert lines[0].startswith("decode lite0: 263/2624 img (10 %), loss 0.004")
    assert lines[-1].startswith("decode lite0: 2624/2624 img (100 %), loss 0.000")


def test_short_loops_stay_silent_in_a_log_and_disabled_ones_everywhere():
    log = io.StringIO()
    assert list(tracked(range(50), "val", "batch", every=None, stream=log)) == list(range(50))
    terminal = _Terminal()
    assert list(tracked(range(50), "val", "batch", enabled=False, stream=terminal)) == list(
        range(50)
    )
    assert log.getvalue() == "" and terminal.getvalue() == ""


def test_a_terminal_gets_a_bar():
    terminal = _Terminal()
    assert sum(tracked(range(5), "embed lite0", "batch", stream=terminal)) == 10
    assert "embed lite0" in terminal.getvalue() and "\r" in terminal.getvalue()


def test_an_epoch_is_one_line_with_its_losses_and_accuracies():
    log = io.StringIO()
    row = {"epoch": 2, "train_loss": 0.6149, "train_acc": 0.74, "val_loss": 0.58, "val_acc": 0.77}
    note(_epoch_line("tf_efficientnet_lite0", 3, row, 41.2), log)
    assert log.getvalue() == (
        "finetune tf_efficientnet_lite0 epoch 2/3: train loss 0.615 acc 0.740, "
        "val loss 0.580 acc 0.770, 41 s\n"
    )
