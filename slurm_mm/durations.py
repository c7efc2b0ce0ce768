"""Parse checkpoint intervals the way Slurm users write times.

Accepts Slurm's time formats (`30` minutes, `30:00` min:sec, `1:00:00`, `1-0` days-hours,
`1-0:30`, `1-0:30:15`), unit suffixes (`45s`, `30m`, `2h`, `1d`) and `off`. The C SPANK
plugin implements the same grammar (spank/mm_args.c); tests/test_durations.py and the
cluster tests keep the two in agreement.
"""

from __future__ import annotations

import re

from slurm_mm.errors import UsageError

_SUFFIX_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SUFFIXED = re.compile(r"^(\d+)([smhd])$")
_DAYS = re.compile(r"^(\d+)-(\d+)(?::(\d+))?(?::(\d+))?$")
_CLOCK = re.compile(r"^(\d+)(?::(\d+))?(?::(\d+))?$")
# Larger values are almost certainly typos; a year also keeps C's int arithmetic safe.
MAX_SECONDS = 365 * 86400


def parse_interval(text: str) -> int:
    """Return the interval in seconds; 0 means `off`. Raises UsageError naming `text`."""
    value = text.strip().lower()
    if value in ("off", "0", "none"):
        return 0
    seconds = _parse(value)
    if seconds is None:
        raise UsageError(
            f"invalid checkpoint interval '{text}': use minutes (30), MM:SS, HH:MM:SS, "
            "D-HH[:MM[:SS]], a number with s/m/h/d (30m), or off"
        )
    if seconds <= 0 or seconds > MAX_SECONDS:
        raise UsageError(f"invalid checkpoint interval '{text}': must be between 1s and 365 days")
    return seconds


def _parse(value: str) -> int | None:
    if m := _SUFFIXED.match(value):
        return int(m.group(1)) * _SUFFIX_SECONDS[m.group(2)]
    if m := _DAYS.match(value):
        days, hours, minutes, secs = (int(g) if g else 0 for g in m.groups())
        if hours > 23 or minutes > 59 or secs > 59:
            return None
        return ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if m := _CLOCK.match(value):
        parts = [int(g) for g in m.groups() if g is not None]
        if len(parts) == 1:  # minutes
            return parts[0] * 60
        if len(parts) == 2:  # minutes:seconds
            minutes, secs = parts
            return None if secs > 59 else minutes * 60 + secs
        hours, minutes, secs = parts
        return None if minutes > 59 or secs > 59 else (hours * 60 + minutes) * 60 + secs
    return None


def format_interval(seconds: int) -> str:
    """Human form used in tables: `30m`, `1h30m`, `45s`, `off`."""
    if seconds <= 0:
        return "off"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            count, seconds = divmod(seconds, size)
            out.append(f"{count}{unit}")
    return "".join(out)
