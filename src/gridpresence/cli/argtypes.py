"""Argument types for every command line of the project (``gridpresence``, ``bots/load_shed.py``):
a number out of range is an argparse error naming the option ("argument --ttl: must be greater
than 0, not '0'"), never a traceback from deeper down."""

from __future__ import annotations

import argparse
import math


class Number:
    """An argparse ``type=``: a finite number within bounds, a whole one if ``integer``."""

    def __init__(self, *, gt: float | None = None, ge: float | None = None, le: float | None = None,
                 integer: bool = False) -> None:
        self.gt, self.ge, self.le, self.integer = gt, ge, le, integer
        self.__name__ = "whole number" if integer else "number"  # argparse names the type in its errors

    def __call__(self, text: str) -> float:
        try:
            value: float = int(text) if self.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {self.__name__}, not {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
        if self.gt is not None and not value > self.gt:
            raise argparse.ArgumentTypeError(f"must be greater than {self.gt:g}, not {text!r}")
        if self.ge is not None and not value >= self.ge:
            raise argparse.ArgumentTypeError(f"must be {self.ge:g} or more, not {text!r}")
        if self.le is not None and not value <= self.le:
            raise argparse.ArgumentTypeError(f"must be {self.le:g} or less, not {text!r}")
        return value


positive = Number(gt=0)  # durations that must pass: --ttl, --timeout
non_negative = Number(ge=0)  # 0 has a meaning (off, "until stopped", no wait) or is a real value
count = Number(ge=0, integer=True)  # --count: 0 means until stopped
index = Number(ge=1, integer=True)  # numbers devices hand out (threshold changes) start at 1
port = Number(ge=1, le=65535, integer=True)


def filter_term(text: str) -> str:
    """An argparse ``type=`` for one ``--filter`` term (``kind=load``): checked here, so a bad
    term is a usage error naming the option, the term and what it may be."""
    from gridpresence.operator.selection import FilterError, parse_term

    try:
        parse_term(text)
    except FilterError as exc:
        # --filter takes every word after it: a device name there is the usual slip.
        hint = "; device names go before --filter (or select them by name=GLOB)" if "=" not in text else ""
        raise argparse.ArgumentTypeError(f"{exc}{hint}") from None
    return text
