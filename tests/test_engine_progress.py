"""The progress bar for logs and pipes: plain lines every few percent, no carriage-return frames."""
import io

from simkit.engine import LineProgress, progress_bar


def test_line_progress_prints_one_line_per_five_percent():
    out = io.StringIO()
    bar = LineProgress(200, unit="task", desc="eval", stream=out)
    for _ in range(200):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 20  # 5%, 10%, ..., 100%
    assert lines[0].startswith("eval: 10/200 task (5%)") and lines[-1].startswith("eval: 200/200 task (100%)")
    assert "\r" not in out.getvalue()


def test_line_progress_jumps_print_once_and_unknown_totals_count():
    out = io.StringIO()
    bar = LineProgress(100, stream=out)
    bar.update(37)  # crosses 5..35% at once: one line
    bar.update(0)
    assert out.getvalue().count("\n") == 1 and "37/100 it (37%)" in out.getvalue()
    out2 = io.StringIO()
    bar2 = LineProgress(None, unit="pair", every_n=10, stream=out2)
    for _ in range(25):
        bar2.update(1)
    assert out2.getvalue().splitlines() == [l for l in out2.getvalue().splitlines() if " pair, " in l]
    assert len(out2.getvalue().splitlines()) == 2


def test_progress_bar_off_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a tty
    assert progress_bar(10, None) is None  # library default: quiet unless on a terminal
    assert isinstance(progress_bar(10, True), LineProgress)  # asked for (the demo, CLI runs): plain lines
