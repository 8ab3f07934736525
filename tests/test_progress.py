"""Progress on long runs (nonlocal_kernels.progress): a live line on a terminal, compact lines
elsewhere, nothing when off; and the benchmark CLI's progress on stderr, its stdout clean."""

import io
import os
import re
import subprocess
import sys

import pytest

from nonlocal_kernels.progress import Progress, format_seconds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_live_line_is_redrawn_in_place_and_cleared_for_other_output():
    out = Terminal()
    with Progress(4, "cases", stream=out, clock=0) as p:
        assert p.mode == "live"
        p.update(0, "(1, 96, 40, 16, 16): naive fwd")
        p.update(1, "(2, 50, 30, 8, 8): sdpa fwd_bwd")
        p.clear()
        width = len(out.getvalue().rsplit("\r", 2)[-2])  # the blanks that erased the line
        assert out.getvalue().endswith("\r" + " " * width + "\r")
        p.update()  # one more done
    text = out.getvalue()
    assert "\n" not in text[:-1] and text.endswith("\n")  # one line, redrawn with \r
    frames = [f.strip() for f in text.split("\r") if f.strip()]
    assert frames[0].startswith("[....................] 0/4 cases | (1, 96, 40, 16, 16): naive")
    assert re.match(r"\[#####\.{15}\] 1/4 cases \| \(2, 50, 30, 8, 8\): sdpa fwd_bwd \| "
                    r"0:00 elapsed, ~0:00 left$", frames[1])
    assert frames[-1].startswith("[##########..........] 2/4 cases")


def test_live_clock_moves_while_an_item_runs():
    out = Terminal()
    p = Progress(2, "cases", stream=out, clock=0.01)
    p.update(0, "a long case")
    import time
    time.sleep(0.2)
    p.close()
    assert out.getvalue().count("\r") > 3  # redrawn by the clock, not only by update()


def test_compact_when_not_a_terminal_and_nothing_when_off():
    out = io.StringIO()
    with Progress(3, "cases", stream=out) as p:
        assert p.mode == "compact"
        for i in range(3):
            p.update(i, f"case {i}")
            p.update(i, f"case {i}, timing")  # the same count: no new line
        p.update(3, "done")
    lines = out.getvalue().splitlines()
    assert [ln.split(" | ")[0] for ln in lines] == ["0/3 cases", "1/3 cases", "2/3 cases",
                                                  "3/3 cases"]
    assert "\r" not in out.getvalue() and lines[1].startswith("1/3 cases | case 1 |")
    many = io.StringIO()
    with Progress(300, "steps", stream=many) as p:
        for i in range(300):
            p.update(i + 1)
    assert len(many.getvalue().splitlines()) == 11  # the first step, then a line per tenth
    quiet = io.StringIO()
    with Progress(3, stream=quiet, mode="off") as p:
        p.update(1, "x")
    assert quiet.getvalue() == ""
    with pytest.raises(ValueError, match="mode"):
        Progress(3, mode="loud")
    assert format_seconds(3725) == "1:02:05" and format_seconds(65.9) == "1:05"


def test_benchmark_cli_shows_progress_on_stderr_and_keeps_stdout_clean(tmp_path):
    # Not a terminal here: a compact line per case on stderr (--progress off: none, as above).
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--out", str(tmp_path),
                          "--shape", "1,24,16,8,8", "--shape", "1,32,16,8,8", "--backends",
                          "naive", "--fwd-only", "--repeats", "1", "--warmup", "0",
                          "--no-plots"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    progress = [ln for ln in out.stderr.splitlines() if " cases | " in ln]
    assert [ln.split(" | ")[:2] for ln in progress] == [
        ["0/2 cases", "(1, 24, 16, 8, 8): naive fwd memory"],
        ["1/2 cases", "(1, 24, 16, 8, 8) done"], ["2/2 cases", "(1, 32, 16, 8, 8) done"]]
    assert all(re.search(r"\d+:\d\d elapsed", ln) for ln in progress)
    assert "cases |" not in out.stdout and "| (1, 32, 16, 8, 8) | naive |" in out.stdout
