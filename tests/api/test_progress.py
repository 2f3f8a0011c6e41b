"""The planning progress bar is drawn on a terminal only, never into a file or a pipe."""
from __future__ import annotations

import io
import logging
import sys

import pytest

from mxnet_mirror_hook import progress


class _Terminal(io.StringIO):
    """A standard error that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _plan_with_progress(label: str) -> None:
    with progress.PlanProgress(label) as bar:
        bar.phase("binding 3 candidate(s)", 3)
        bar.advance(2)
        bar.phase("allocator search", 200)
        bar.advance(150)


@pytest.fixture
def no_delay(monkeypatch):
    monkeypatch.setattr(progress, "PROGRESS_DELAY_SECONDS", 0.0)
    monkeypatch.delenv(progress.PROGRESS, raising=False)


def test_a_stream_that_is_no_terminal_gets_no_bar_even_with_info_logging_shown(no_delay, monkeypatch):
    log_file = io.StringIO()
    handler = logging.StreamHandler(log_file)
    handler.setLevel(logging.INFO)
    package = logging.getLogger("mxnet_mirror_hook")
    package.addHandler(handler)
    monkeypatch.setattr(package, "level", logging.INFO)
    redirected = io.StringIO()
    monkeypatch.setattr(sys, "stderr", redirected)
    try:
        _plan_with_progress("data 32x3x224x224")
    finally:
        package.removeHandler(handler)
    assert redirected.getvalue() == "" and log_file.getvalue() == ""
    assert not progress.bar_wanted()


def test_a_terminal_gets_the_bar_unless_the_variable_turns_it_off(no_delay, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _plan_with_progress("data 32x3x224x224")
    drawn = terminal.getvalue()
    assert "mirror plan data 32x3x224x224" in drawn and "binding 3 candidate(s)" in drawn and "\r" in drawn
    for off in ("0", "off", "false"):
        monkeypatch.setenv(progress.PROGRESS, off)
        silent = _Terminal()
        monkeypatch.setattr(sys, "stderr", silent)
        _plan_with_progress("data 1x1")
        assert silent.getvalue() == "" and not progress.bar_wanted(), off


def test_a_closed_or_bare_standard_error_gets_no_bar(no_delay, monkeypatch):
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    assert not progress.bar_wanted()
    monkeypatch.setattr(sys, "stderr", object())
    assert not progress.bar_wanted()
