"""Progress without a terminal: complete plain lines, numbers with meaningful precision."""

import io

from radio_distill.progress import Progress, fmt


def test_plain_lines_are_complete_and_carry_the_info():
    out = io.StringIO()
    losses = "clip/summary 0.41234  clip/spatial 0.08123  dinov2/summary 0.30000  dinov2/spatial 0.07777  sam/spatial 0.1"
    with Progress("training", total=4, unit="steps", start=1, every=0, stream=out) as p:
        p.advance(1, info=losses)
        p.advance(2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # one per advance (every=0) and the final one
    assert lines[0].startswith("training: 2/4 steps (50%), ") and lines[0].endswith("| " + losses)
    assert lines[-1].startswith("training: 4/4 steps (100%), ") and "eta" not in lines[-1]
    assert all(len(line) > 80 for line in lines)  # never cut at a terminal width


def test_lines_come_at_a_steady_rate_not_per_step():
    out = io.StringIO()
    with Progress("caching", total=1000, unit="images", every=3600, stream=out) as p:
        for _ in range(1000):
            p.advance()
    assert out.getvalue().count("\n") == 1  # only the final line within the hour


def test_disabled_is_silent_and_slow_rates_keep_their_digits():
    out = io.StringIO()
    with Progress("x", total=2, unit="steps", enabled=False, every=0, stream=out) as p:
        p.advance(2)
    assert out.getvalue() == ""
    assert [fmt(v) for v in (0.05123, 0.0004, 3.14159, 2741.3, 0)] == ["0.0512", "0.0004", "3.14", "2741", "0"]


def test_terminal_gets_a_bar():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    with Progress("training", total=3, unit="steps", every=0, stream=out) as p:
        p.advance(3, info="loss 0.5")
    assert "training" in out.getvalue() and "3/3" in out.getvalue()


def test_help_into_a_pipe_cuts_no_option_name():
    import subprocess
    import sys

    code = "import sys; from radio_distill.cli import train_app; sys.argv = ['radio-train', '--help']; train_app()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    options = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("│ --")]
    assert "--resolution-policy" in options and not [o for o in options if "…" in o]
