"""Progress for long work: tqdm bars and one-line notes, quiet on non-zero ranks and when UPVIT_NO_PROGRESS is set.

A scoring run is one *job*: :func:`job` opens one bar for all of its phases and rounds (a Fisher
screen, exact rounds, greedy rounds ...). A job opened while another is running (e.g. the exact
engine called by the hybrid scorer) adds its work to the running job instead of opening a bar of
its own, so the user sees one bar with one ETA per command. Work is counted in *cost units*
chosen by the job's owner (the scorers use forward passes of one proxy input through the whole
model), so phases of different speed share one rate. A job whose total grows (the hybrid scorer's
later rounds) says so in its description.

:func:`note` prints one line (the plan of a job, its estimated time) above any bar.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

WARMUP_SECONDS = 2.0  # measured work before a job prints its time estimate
_clock = time.perf_counter  # the jobs' clock (a test replaces it)


def enabled() -> bool:
    """Whether bars and notes are shown: on the main rank, unless UPVIT_NO_PROGRESS is set."""
    from . import distributed as dist_utils

    return dist_utils.is_main() and not os.environ.get("UPVIT_NO_PROGRESS")


def progress(iterable=None, **kwargs):
    disable = kwargs.pop("disable", False) or not enabled()
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, disable=disable, **kwargs)


def note(message: str, show: bool = True) -> None:
    """One line for the user on stderr, printed above any running bar (main rank, progress enabled)."""
    if show and enabled():
        tqdm.write(f"upvit: {message}", file=sys.stderr)


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``, ``4.3 days``: a duration at the precision an estimate has."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class Job:
    """The one bar of a job; see the module doc. ``update`` counts finished work, ``extend`` adds work
    found later (a new round), ``phase`` names what runs now."""

    def __init__(self, desc: str, total: float, unit: str, show: bool, estimate: bool) -> None:
        self.desc, self.unit = desc, unit
        self.show = show and enabled()
        self._bar = None  # opened at the first work, so a job's plan line comes before its bar
        self.total, self.done = float(total), 0.0
        self.created = _clock()
        self.started: float | None = None  # when the measured work began (set-up excluded) ...
        self.done_at_start = 0.0  # ... and how much was done then
        self.estimate_pending = estimate
        self.growing = False
        self.current = self.part = ""

    @property
    def bar(self):
        if self._bar is None:
            self._bar = progress(total=self.total, desc=self.desc, unit=self.unit, disable=not self.show, leave=True,
                                 bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} {unit} [{elapsed}<{remaining}]{postfix}")
            self._describe()
        return self._bar

    def begin(self) -> None:
        """Mark the start of the measured work (the time estimate excludes what ran before)."""
        if self.started is None:
            self.started, self.done_at_start = _clock(), self.done

    def arm(self) -> None:
        """Print an estimate after the next WARMUP_SECONDS of work (measured from now): for a job whose
        main work is known only after a first phase (the hybrid scorer's first exact round)."""
        self.estimate_pending, self.started = True, None
        self.begin()

    def extend(self, amount: float, growing: bool = False) -> None:
        self.total += amount
        self.growing = self.growing or growing
        if amount or self._bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def phase(self, text: str) -> None:
        """Name the phase running now (a new phase clears the detail)."""
        self.current, self.part = text, ""
        if self._bar is not None:
            self._describe()

    def detail(self, text: str) -> None:
        """Name the part of the phase running now (a nested job's phase, e.g. the site being scored)."""
        if text != self.part:
            self.part = text
            if self._bar is not None:
                self._describe()

    def _describe(self) -> None:
        text = ": ".join(t for t in (self.desc, self.current, self.part) if t)
        self.bar.set_description_str(text + (" (later rounds add work)" if self.growing else ""), refresh=False)

    def update(self, amount: float) -> None:
        self.begin()
        self.done += amount
        self.bar.update(amount)
        if self.estimate_pending and self.done < self.total:
            spent = _clock() - self.started
            measured = self.done - self.done_at_start
            if spent >= WARMUP_SECONDS and measured > 0:
                self.estimate_pending = False
                rate = measured / spent
                left = (self.total - self.done) / rate
                known = " of the work known so far (later rounds or steps add to it)" if self.growing else ""
                note(f"estimated time: about {format_seconds(left)} left, {format_seconds(self.elapsed() + left)} "
                     f"in all{known} (measured on {measured / self.total:.1%} of the work, {spent:.1f} s)", self.show)

    def elapsed(self) -> float:
        return _clock() - self.created

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _Child:
    """A job opened inside a running one: its work goes to the parent's bar."""

    def __init__(self, parent: Job) -> None:
        self.parent = parent
        self.show = parent.show

    def begin(self) -> None:
        self.parent.begin()

    def arm(self) -> None:
        pass  # the running job decides when it estimates

    def extend(self, amount: float, growing: bool = False) -> None:
        self.parent.extend(amount, growing)

    def phase(self, text: str) -> None:
        self.parent.detail(text)

    def detail(self, text: str) -> None:
        self.parent.detail(text)

    def update(self, amount: float) -> None:
        self.parent.update(amount)


class Scaled:
    """A job's bar counting in other units: ``update(n)`` adds ``n * factor`` (e.g. inputs -> forward passes)."""

    def __init__(self, bar: Job | _Child, factor: float) -> None:
        self.bar, self.factor = bar, factor

    def update(self, amount: float) -> None:
        self.bar.update(amount * self.factor)

    def phase(self, text: str) -> None:
        self.bar.phase(text)


_ACTIVE: list[Job] = []


@contextmanager
def job(desc: str, total: float = 0.0, unit: str = "fwd", show: bool = True, estimate: bool = True,
        add_to_running: bool = True) -> Iterator[Job | _Child]:
    """One bar for the whole job (see the module doc); inside a running job, that job's bar.

    ``total``: the work known now, in ``unit``; ``estimate``: print the estimated time once
    :data:`WARMUP_SECONDS` of work are measured (the warm-up is part of the work, nothing is redone).
    A nested job adds ``total`` to the running job."""
    if add_to_running and _ACTIVE:
        child = _Child(_ACTIVE[-1])
        if total:
            child.extend(total)
        yield child
        return
    top = Job(desc, total, unit, show, estimate)
    _ACTIVE.append(top)
    try:
        yield top
    finally:
        _ACTIVE.remove(top)
        top.close()


def running() -> bool:
    """Whether a job's bar is open (a scorer then reports into it and prints no plan of its own)."""
    return bool(_ACTIVE)
