"""What `mc-pipeline demo` tells a new user: its progress without a terminal, the wait for the
schedule's tick, and that the sandbox it offers for more syncs starts fresh (issue 12, items 4-5)."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

from mc_pipeline.demo import Progress, closing_text, full_refresh_command, next_tick_in, waiting_note
from mc_pipeline.jobs import sync_run_config

README = Path(__file__).resolve().parents[1] / "README.md"


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_without_a_terminal_each_change_is_a_line_and_the_last_state_is_kept() -> None:
    """The status was rewritten with `\\r` or printed every 15 s; the last state (e.g. "2/2 done")
    never reached a log because the loop ended first."""
    out = _Pipe()
    progress = Progress(out)
    assert not progress.tty
    progress.update((0, 0, 0), "0/2 done | 0.5s")
    progress.update((0, 0, 0), "0/2 done | 1.0s")  # only the clock moved: no new line
    progress.update((0, 1, 1), "0/2 done, 1 running, 1 queued | 1.5s")
    progress.update((2, 0, 0), "2/2 done | 9.0s")
    progress.close()
    assert out.getvalue().splitlines() == ["0/2 done | 0.5s", "0/2 done, 1 running, 1 queued | 1.5s", "2/2 done | 9.0s"]
    assert "\r" not in out.getvalue()


def test_without_a_terminal_a_state_seen_only_between_lines_is_printed_at_the_end() -> None:
    out = _Pipe()
    progress = Progress(out)
    progress.update(1, "a")
    progress._at -= 20  # as if 20 s passed
    progress.update(1, "a, later")  # printed: 15 s without a line
    progress.update(1, "a, later still")  # within 15 s: held back ...
    progress.close()  # ... and printed at the end
    assert out.getvalue().splitlines() == ["a", "a, later", "a, later still"]


def test_on_a_terminal_the_line_is_rewritten_and_ends_with_a_newline() -> None:
    out = io.StringIO()
    progress = Progress(out, tty=True)
    progress.update(0, "0/2 done")
    progress.update(2, "2/2 done")
    progress.close()
    assert out.getvalue() == "\r0/2 done\r2/2 done\n"


def test_next_tick_counts_down_to_the_minute() -> None:
    minute = 999_999_960.0  # a whole minute (divisible by 60)
    assert next_tick_in(minute + 20) == 40.0
    assert next_tick_in(minute + 59.5) == 0.5


def test_the_wait_for_the_schedule_says_when_it_ticks() -> None:
    """The demo sat 45 s at "0/2 done" without saying it waited for the next minute's tick."""
    minute = 999_999_960.0
    note = waiting_note("hourly_incremental_sync", 60, minute + 15)
    last = time.strftime("%H:%M:%S", time.localtime(minute))
    assert note == f" | waiting for hourly_incremental_sync (ticks every 60s: last {last}, next in 45s)"
    assert waiting_note("mailchimp_lists_sensor", None, minute) == " | waiting for mailchimp_lists_sensor"


def test_the_closing_text_says_the_next_sandbox_starts_fresh_and_how_to_resync(tmp_path: Path) -> None:
    """The demo offered a sandbox "for more syncs" that starts empty while the watermarks say synced."""
    text = closing_text(
        tmp_path / "dagster_home",
        tmp_path / "clients.yaml",
        tmp_path / "data",
        tmp_path / "sandbox.env",
        "mc-pipeline sandbox --port 8765",
    )
    assert "starts fresh" in text and "Ometria empty" in text and "full refresh" in text
    assert "&" not in text.replace("&&", "")  # no server put behind `&`
    assert "mc-pipeline sandbox --port 8765" in text and "another terminal" in text
    assert f"for key in $(mc-pipeline partitions list); do {full_refresh_command('$key')}; done" in text


def test_the_demos_full_refresh_is_the_readmes_and_the_jobs() -> None:
    command = full_refresh_command("client-1:ac8136eaff")
    config = json.loads(re.search(r"--config-json '(.*)'", command).group(1))  # type: ignore[union-attr]
    assert config == sync_run_config(full_refresh=True)
    readme = README.read_text(encoding="utf-8")
    readme_config = re.search(r"--config-json '(\{.*\})'", readme).group(1)  # type: ignore[union-attr]
    assert json.loads(readme_config) == config
