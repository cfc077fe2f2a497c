"""The one progress helper: off a terminal it writes a line with the rate and ETA every few seconds."""

from __future__ import annotations

import io

from zoomfeat.progress import LineProgress, progress


def test_line_progress_writes_rate_and_eta_at_most_every_interval():
    now = [0.0]
    stream = io.StringIO()
    bar = LineProgress(100, "sampling", "step", every=5.0, stream=stream, clock=lambda: now[0])
    for _ in range(4):  # 4 steps a second for 1 s: no line yet
        now[0] += 0.25
        bar.update(1)
    assert stream.getvalue() == ""
    for _ in range(16):  # 4 more seconds -> 5 s elapsed: one line (20 done, 80 left at 4/s)
        now[0] += 0.25
        bar.update(1)
    lines = stream.getvalue().splitlines()
    assert lines == ["sampling: 20/100 step (20%), 4 step/s, ETA 0:00:20"]
    bar.close()  # a final line
    assert len(stream.getvalue().splitlines()) == 2


def test_progress_off_a_terminal_is_a_line_progress(monkeypatch, capsys):
    monkeypatch.setenv("ZOOMFEAT_PROGRESS_SECONDS", "0")
    tick, close = progress(3, "invert", "step")
    tick(1)
    close()
    err = capsys.readouterr().err
    assert "invert: 1/3 step (33%)" in err and "ETA" in err
