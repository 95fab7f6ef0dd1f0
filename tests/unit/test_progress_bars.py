"""Remote progress bars: the marked line, the driver's drawing, the API's checks."""
from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from meshray.common.progress_bar import BAR_MARKER, bar_line, parse_bar_line
from meshray.core.progress_bars import BarPrinter, format_bar
from meshray.experimental import tqdm_ray


def state(**changes) -> dict:
    base = {"id": "b1", "desc": "steps", "unit": "it", "n": 3, "total": 10, "pos": 0,
            "elapsed": 1.5, "closed": False}
    return {**base, **changes}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def line(text: str, is_err: bool = False):
    return SimpleNamespace(prefix="(work pid=7)", text=text, is_err=is_err)


def test_a_bar_line_round_trips_and_hostile_ones_are_refused():
    assert parse_bar_line(bar_line(state())) == state()
    assert parse_bar_line("plain output") is None
    for bad in (BAR_MARKER + "{", BAR_MARKER + "[]", bar_line({**state(), "extra": 1}),
                bar_line(state(n=-1)), bar_line(state(total="10")), bar_line(state(pos=True)),
                BAR_MARKER + '{"id":"b","desc":"","unit":"","n":NaN,"total":null,"pos":0,'
                '"elapsed":0,"closed":false}'):
        assert parse_bar_line(bad) is None, bad
    # No terminal escape sequences from task code reach the driver.
    assert parse_bar_line(bar_line(state(desc="\x1b[2Jwipe")))["desc"] == "[2Jwipe"


def test_format_shows_count_percentage_and_rate():
    text = format_bar("(work pid=7)", state(n=5, elapsed=2.0))
    assert text.startswith("(work pid=7) steps:  50%|") and "| 5/10 [00:02, 2.50it/s]" in text
    assert format_bar("", state(total=None, desc="")) == "3it [00:01, 2.00it/s]"


def test_off_a_terminal_a_bar_prints_once_when_it_closes(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    printer = BarPrinter()
    printer.show_logs([line(bar_line(state())), line("hello"), line(bar_line(state(n=7)))])
    assert out.getvalue() == "(work pid=7) hello\n"
    printer.show_logs([line(bar_line(state(n=10, closed=True)))])
    assert out.getvalue().count("steps") == 1 and "10/10" in out.getvalue()
    assert BAR_MARKER not in out.getvalue() and printer.finished == 1


def test_on_a_terminal_output_is_printed_above_the_bars(monkeypatch):
    out = Terminal()
    monkeypatch.setattr("sys.stdout", out)
    printer = BarPrinter()
    printer.show_logs([line(bar_line(state()))])
    assert out.getvalue().endswith("3/10 [00:01, 2.00it/s]\n")
    before = len(out.getvalue())
    printer.show_logs([line("hello")])
    # The bar is erased (cursor up one line, clear), the line printed, the bar drawn again.
    assert out.getvalue()[before:].startswith("\x1b[1F\x1b[J(work pid=7) hello\n(work pid=7) steps:")


def test_tqdm_checks_its_arguments_and_counts():
    with pytest.raises(ValueError, match=r"total=-1\): expected a number >= 0 or None"):
        tqdm_ray.tqdm(total=-1)
    with pytest.raises(TypeError, match=r"position='top'\): expected an int >= 0"):
        tqdm_ray.tqdm(position="top")
    bar = tqdm_ray.tqdm(range(4), desc="loop", flush_interval_s=60)
    assert bar.total == 4 and list(bar) == [0, 1, 2, 3] and bar.n == 4
