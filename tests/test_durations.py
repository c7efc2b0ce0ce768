"""Interval grammar: Python (slurm_mm.durations) and C (spank/mm_args.c) agree."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from slurm_mm.durations import format_interval, parse_interval
from slurm_mm.errors import UsageError

REPO = Path(__file__).resolve().parents[1]

VALID = {
    "30": 1800, "30:00": 1800, "30:15": 1815, "1:00:00": 3600, "1-0": 86400,
    "1-0:30": 88200, "1-0:30:15": 88215, "2-12": 216000, "30m": 1800, "2h": 7200,
    "45s": 45, "1d": 86400, "OFF": 0, "off": 0, " 30m ": 1800,
}
INVALID = ["bogus", "", "10x", "1:99", "1:00:99", "-5", "1-25", "1-", "m", "30mm",
           "1:2:3:4", "99999999999", "366d", "1.5h"]


@pytest.mark.parametrize("text,seconds", VALID.items())
def test_valid_intervals_parse(text, seconds):
    assert parse_interval(text) == seconds


@pytest.mark.parametrize("text", INVALID)
def test_invalid_interval_names_the_value(text):
    with pytest.raises(UsageError) as err:
        parse_interval(text)
    assert f"'{text}'" in str(err.value)
    assert "\n" not in str(err.value)


def test_format_interval_for_tables():
    assert format_interval(5400) == "1h30m"
    assert format_interval(90061) == "1d1h1m1s"
    assert format_interval(45) == "45s"
    assert format_interval(0) == "off"
    for seconds in (45, 1800, 7200, 86400):  # single-unit forms parse back
        assert parse_interval(format_interval(seconds)) == seconds


@pytest.fixture(scope="module")
def c_parser() -> Path:
    """spank/mm_args.c built into its test driver (slurm_error defined there)."""
    subprocess.run(["make", "-s", "-C", str(REPO / "spank"), "mm_args_check"], check=True)
    return REPO / "spank" / "mm_args_check"


def test_c_and_python_grammars_agree(c_parser):
    inputs = list(VALID) + INVALID
    c_values = []
    for text in inputs:
        out = subprocess.run([str(c_parser), "interval", text], capture_output=True, text=True, check=True)
        c_values.append(-1 if out.stdout.strip() == "invalid" else int(out.stdout))
    for text, c_value in zip(inputs, c_values):
        try:
            expected = parse_interval(text)
        except UsageError:
            expected = -1
        assert c_value == expected, f"C and Python disagree on {text!r}"
