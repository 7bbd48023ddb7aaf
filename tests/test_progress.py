"""Long work is never silent: every scorer prints its plan first and shows one bar for the whole job
(all phases and rounds), exact scoring prints its size and a time estimate measured on its own first
candidates (nothing is computed twice), and the README states the cost of every scoring command."""
from __future__ import annotations

import os
import re

import pytest
import torch

import upvit
import upvit.importance.kl as kl_module
import upvit.progress as progress_module
from helpers import REPO, tiny_images, tiny_vit

BAR = re.compile(r"^(?P<desc>[^|]*?):?\s+(?P<pct>\d+)%\|.*\| (?P<n>[\d.]+)/(?P<total>[\d.]+) (?P<unit>\S+)")
# tiny_vit: residual 24, 2 blocks of 24 attention dims and 48 FFN units
TINY_CHANNELS = 24 + 2 * (24 + 48)


def screens(text: str) -> list[str]:
    """Every state a terminal showed: tqdm redraws a line with carriage returns."""
    return [part.strip() for line in text.split("\n") for part in line.split("\r") if part.strip()]


def bars(text: str) -> list[re.Match]:
    return [m for m in (BAR.match(s) for s in screens(text)) if m]


@pytest.fixture
def shown(monkeypatch):
    """Progress on (the test suite silences it), and the estimate after the first measured work."""
    monkeypatch.delenv("UPVIT_NO_PROGRESS", raising=False)
    monkeypatch.setattr(progress_module, "WARMUP_SECONDS", 0.0, raising=False)


def run_method(method: str) -> upvit.Scores:
    torch.manual_seed(0)
    model, images = tiny_vit(), tiny_images(6)
    options = {"ratios": [0.5]} if method in ("hybrid", "greedy") else {}
    if method == "taylor":
        options["labels"] = torch.arange(6) % 5
    return upvit.score(model, images, method=method, **options)


@pytest.mark.parametrize("method", ["kl", "fisher", "hybrid", "greedy", "taylor"])
def test_every_scorer_prints_its_plan_then_one_bar_for_the_whole_job(method, shown, capsys):
    scores = run_method(method)
    err = capsys.readouterr().err
    lines = screens(err)
    assert lines and lines[0].startswith("upvit: "), err[:500]  # the plan comes before any bar
    found = bars(err)
    assert found, err[:2000]
    names = {m["desc"].split(":")[0] for m in found}
    assert len(names) == 1, names  # one bar for the job, however many phases and rounds it has
    last = found[-1]
    # everything the job did was counted on it: the bar ends full, with nothing left uncounted
    assert float(last["n"]) == pytest.approx(float(last["total"]), rel=1e-6), last.group(0)
    assert last["unit"] == "img-fwd"
    if method == "hybrid":  # the exact rounds report on the same bar as the screen
        assert any("round 1" in m["desc"] for m in found) and any("Fisher" in m["desc"] for m in found)
        assert scores.meta["rounds"] >= 1
    if method == "greedy":
        assert "round" in lines[0] and "forward passes" in lines[0], lines[0]


def test_exact_scoring_says_its_size_and_estimates_its_time_from_its_own_first_candidates(shown, capsys, monkeypatch):
    calls = []
    real = kl_module.forward_from

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kl_module, "forward_from", counting)
    shown_scores = run_method("kl")
    err = capsys.readouterr().err
    plan = next(line for line in screens(err) if line.startswith("upvit: exact kl scores"))
    assert f"{TINY_CHANNELS:,} channels x 6 proxy images = {TINY_CHANNELS * 6:,} candidate evaluations" in plan, plan
    estimate = [line for line in screens(err) if line.startswith("upvit: estimated time:")]
    assert len(estimate) == 1 and re.search(r"about \d+ s left, \d+ s in all", estimate[0]), estimate
    # the warm-up is the run's own start: the same forwards as a silent run, and the same scores
    forwards = len(calls)
    calls.clear()
    monkeypatch.setenv("UPVIT_NO_PROGRESS", "1")
    silent_scores = run_method("kl")
    assert not capsys.readouterr().err
    assert len(calls) == forwards
    for key, value in silent_scores.items():
        assert torch.equal(value, shown_scores[key]), key


def test_estimate_extrapolates_the_measured_rate_to_the_whole_job(monkeypatch, capsys):
    """The estimate is (work left) / (work measured per second), with the work in forward passes."""
    monkeypatch.delenv("UPVIT_NO_PROGRESS", raising=False)
    monkeypatch.setattr(progress_module, "WARMUP_SECONDS", 1.0)
    now = [100.0]
    monkeypatch.setattr(progress_module, "_clock", lambda: now[0])
    with progress_module.job("test", 1000, unit="img-fwd") as bar:
        bar.begin()
        now[0] = 100.5
        bar.update(10)  # 0.5 s: still warming up, no estimate yet
        assert "estimated" not in capsys.readouterr().err
        now[0] = 102.0
        bar.update(90)  # 100 units in 2 s: 50 units/s, 900 left -> 18 s; 2 s elapsed + 18 s = 20 s
    err = capsys.readouterr().err
    assert "estimated time: about 18 s left, 20 s in all (measured on 10.0% of the work, 2.0 s)" in err, err


def test_a_job_inside_a_job_reports_on_the_outer_bar(shown, capsys):
    with progress_module.job("outer", 10, unit="img-fwd") as outer:
        outer.update(5)
        with progress_module.job("inner", 20) as inner:
            inner.update(20)
        outer.update(5)
        assert outer.total == 30 and outer.done == 30
    assert {m["desc"].split(":")[0] for m in bars(capsys.readouterr().err)} == {"outer"}


def test_depth_unit_scores_show_progress(shown, capsys):
    from upvit.depth import candidates, score_candidates

    model = tiny_vit(depth=3)
    score_candidates(model, tiny_images(4), candidates(model), "kl")
    err = capsys.readouterr().err
    assert screens(err)[0] == "upvit: exact KL of 5 removal candidates x 4 proxy images", err[:300]
    last = bars(err)[-1]
    assert float(last["n"]) == pytest.approx(float(last["total"]), rel=1e-6)


def test_progress_off_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv("UPVIT_NO_PROGRESS", "1")
    run_method("hybrid")
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ the README states every scoring command's cost
COST = re.compile(r"\d[\d.,]*\s*(?:-\s*\d[\d.,]*\s*)?(?:s|min|minutes|h|hours|days)\b")


def test_readme_states_the_cost_of_every_scoring_command():
    with open(os.path.join(REPO, "README.md")) as f:
        lines = f.read().splitlines()
    # commands, not prose: a shell line, the command table's row, a Python call's assignment
    command = re.compile(r"^(?:upvit score |torchrun .*-m upvit score |\| `upvit score )|= upvit\.score\(")
    missing = []
    for i, line in enumerate(lines):
        if command.search(line.strip()) and "method=\"magnitude\"" not in line:
            window = "\n".join(lines[max(0, i - 2):i + 3])
            if not COST.search(window):
                missing.append(f"README.md:{i + 1}: {line.strip()[:100]}")
    assert not missing, "scoring commands without their cost nearby:\n" + "\n".join(missing)
