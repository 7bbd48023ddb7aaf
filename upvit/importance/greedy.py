"""Greedy residual selection: score each residual channel under the joint removal already decided.

The paper scores every channel alone, on the intact model (docs/method.md section 2). At a 75% cut
of the residual stream the channels' interactions dominate: a channel that is harmless alone may be
essential once its neighbours are gone. This option (beyond the paper) picks the residual channels
to remove in rounds, on the paper's own criterion evaluated jointly:

    round r: with R the channels removed so far, score every surviving channel c by
             s_c = sum over proxy inputs of KL(q || p_{R + c}),
             q the **original** model's output, p_{R + c} the output with R and c removed (the exact
             removal semantics of docs/method.md section 1, through the adapter's keep-masks);
             remove the ``batch`` lowest; repeat until the target width.

The path passes through every requested width of the stage (a round never jumps over one), so one
run serves several targets: the S and T shapes of the demo share the path 192 -> 96 -> 48.

Only the residual sites are chosen greedily (each stage with the other stages intact); attention and
FFN sites keep the scores given as ``initial`` (the paper's one-shot scores) or, without them, exact
one-shot scores computed here.

Cost: round r scores every survivor exactly, one forward of the proxy set from the unit where the
site's mask first acts (the inputs, for a ViT's residual stream) per survivor; candidates share
forwards on the batch axis. The first round is the paper's one-shot score, so exact one-shot scores
given as ``initial`` (checked on the lowest channels) save it.

**Screening** (``screen=True``, an option, off by default): a channel's last exact score is used as
a screen for its score now; each round re-scores the lowest ``batch + band`` survivors exactly, the
drift (new - old) / sqrt(rounds since the old score) of those gives a calibration (median mu) and a
tail-aware spread sigma (as in :mod:`upvit.importance.hybrid`), and the round's decision stands when
every channel not re-scored this round is still z sigma (scaled by sqrt of its age) above the highest
score removed; otherwise exactly those channels are re-scored and the test repeats. Like the hybrid
scorer this is a statistical margin, not a proof: where removals interact strongly (a channel's
score can fall by several sigma in one round once a partner is gone, as on small random models) it
can pick a different channel than exact greedy. The hybrid engine's Fisher screen does not apply here:
it expands the KL around an unperturbed model (zero value, zero gradient), while under a joint
removal measured against the original's output neither vanishes.

Returned values: a residual site's values encode the greedy order, so :func:`upvit.plan.make_plan`
keeps the greedy set at every width the path passed: a channel removed in round r (0-based) scores
in (r, r+1) (by its exact score within the round), the survivors of the last round score above
every removed channel (by their last scores). The exact scores, the removal order and the joint
divergence after each round are in ``meta["greedy"]``.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from ..adapters.base import Adapter, Inputs, Masks, batch_len, removal_masks
from ..errors import UpvitError
from ..progress import job, note
from ..targets import Targets
from .api import register_method
from .hybrid import MIN_CALIBRATION
from .kl import kl_scores
from .reference import Reference, samples_word
from .scores import Scores


class JointKL:
    """Exact ``sum_i KL(q_i || p_i)`` of one site under a keep-mask, for many candidate removals (for a
    sentence encoder the adapter's divergence, ``1 - cos``, as in the one-shot engine).

    ``q`` is the unmasked model's output, from the shared :class:`~upvit.importance.reference.Reference`
    (computed once per run). The streams entering the unit where the site's mask first acts are cached
    (for a residual site of stage 0: the inputs), so every evaluation runs from there; candidates are
    stacked on the batch axis with ``[C*B, size]`` masks.
    """

    def __init__(self, adapter: Adapter, inputs: Inputs, key: str, batch_size: int = 64,
                 candidate_batch: int | None = None, reference: Reference | None = None) -> None:
        self.adapter = adapter
        self.reference = reference or Reference(adapter, inputs, batch_size)  # shared by a run's sites
        self.topology = self.reference.topology
        self.site = self.topology.site(key)
        self.start = self.topology.start_unit(key)
        self.dtype = self.reference.dtype
        self.streams = self.reference.streams_at(self.start)  # None: candidates run from the inputs
        self.C = self.reference.candidate_batch(candidate_batch, self.streams)
        self.evaluations = 0  # candidate evaluations (each over the whole proxy set)
        self.bar: Any = None  # a progress job told of every evaluation, in forward passes of the model
        self.n = batch_len(self.reference.inputs)
        self.cost = evaluation_cost(self.topology, key)

    def _run(self, n: int, masks: torch.Tensor, copies: int) -> torch.Tensor:
        with self.adapter.masking(Masks({self.site.key: masks})):
            return self.reference.run(n, self.start, copies, self.streams)

    @torch.no_grad()
    def current(self, keep: torch.Tensor) -> float:
        """The divergence with the channels where ``keep`` is 0 removed."""
        total = 0.0
        keep = keep.to(self.reference.device, self.dtype)
        for n in range(len(self.reference.batches)):
            total += float(self.reference.divergence(n, self._run(n, keep, 1))[0])
        self._count(1)
        return total

    def _count(self, candidates: int) -> None:
        if self.bar is not None:
            self.bar.update(candidates * self.n * self.cost)

    @torch.no_grad()
    def removals(self, keep: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``[len(idx)]`` float64: the divergence with ``keep``'s removals plus channel ``idx[c]``."""
        idx = torch.as_tensor(idx, dtype=torch.long).flatten()
        out = torch.zeros(idx.numel(), dtype=torch.float64)
        if not idx.numel():
            return out
        device = self.reference.device
        keep = keep.to(device, self.dtype)
        offset = 0
        for chunk in idx.split(self.C):
            acc = torch.zeros(len(chunk), dtype=torch.float64, device=device)
            for n in range(len(self.reference.batches)):
                masks = removal_masks(self.site.size, chunk, self.reference.rows(n), keep) * keep
                acc += self.reference.divergence(n, self._run(n, masks, len(chunk)))
            out[offset:offset + len(chunk)] = acc.cpu()
            offset += len(chunk)
            self._count(len(chunk))
        self.evaluations += idx.numel()
        return out


def evaluation_cost(topology: Any, key: str) -> float:
    """Work of one evaluation on one input, in forward passes of the whole model (the units it runs)."""
    units = len(topology.units)
    return max(1, units - max(topology.start_unit(key), 0)) / units


def path_evaluations(size: int, widths: list[int], batch: int, first_round: bool = True) -> tuple[int, int]:
    """Rounds and candidate evaluations (survivors scored, plus one joint divergence per round) of
    :func:`greedy_path` without screening (an upper bound with it), from ``size`` channels down to
    ``min(widths)``; ``first_round=False``: the first round's scores are given."""
    widths = sorted({w for w in widths if w < size}, reverse=True)
    alive, rounds, evaluations = size, 0, 0
    while widths and alive > widths[-1]:
        evaluations += (alive if rounds or first_round else 0) + 1
        alive -= min(batch, alive - max(w for w in widths if w < alive))
        rounds += 1
    return rounds, evaluations


def _calibration(diffs: torch.Tensor) -> tuple[float, float]:
    """Median and tail-aware robust spread of the screen's errors (infinite until enough samples)."""
    if diffs.numel() < MIN_CALIBRATION:
        return 0.0, math.inf
    mu = float(diffs.median())
    dev = (diffs - mu).abs()
    return mu, max(1.4826 * float(dev.median()), float(torch.quantile(dev, 0.95)) / 1.96)


def _lowest(values: torch.Tensor, channels: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` channels with the lowest values (ties: the lower index)."""
    ch = channels.sort().values
    return ch[torch.argsort(values[ch], stable=True)[:k]]


def greedy_path(joint: JointKL, widths: list[int], screen_values: torch.Tensor, batch: int = 16,
                screen: bool = False, band: float = 0.1, min_band: int = 4, z: float = 3.0,
                exact_initial: bool = False, done: list[dict[str, Any]] | None = None,
                on_round: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Greedy removal rounds on one site down to ``min(widths)``, passing through every width.

    ``joint``: anything with ``site.size``, ``removals(keep, idx)`` and ``current(keep)`` (a
    :class:`JointKL`). ``screen_values``: the values before the first round (the one-shot scores);
    with ``exact_initial`` they are the exact scores of the intact model, so the first round needs
    no scoring. Returns the rounds (removed channels with their exact scores, the joint divergence
    after the round, how many channels were scored exactly in it) and the survivors. ``done``: rounds
    of an interrupted run to replay (their removals are applied, nothing is scored again);
    ``on_round(rounds)`` is called after every round (to persist them)."""
    size = joint.site.size
    alive = torch.ones(size, dtype=torch.bool)
    keep = torch.ones(size, dtype=torch.float64)
    values = screen_values.detach().to(torch.float64).cpu().clone()
    # round in which each value was scored exactly (-1: a screen value from before the first round)
    scored_at = torch.full((size,), 0 if exact_initial else -1, dtype=torch.long)
    widths = sorted({w for w in widths if w < size}, reverse=True)
    rounds: list[dict[str, Any]] = []
    for rnd in done or []:
        idx = torch.tensor(rnd["removed"], dtype=torch.long)
        alive[idx] = False
        keep[idx] = 0.0
        rounds.append(rnd)
    if rounds:
        scored_at[:] = -1  # the screen's values are from before the first round
    while widths and int(alive.sum()) > widths[-1]:
        r = len(rounds)
        n_alive = int(alive.sum())
        b = min(batch, n_alive - max(w for w in widths if w < n_alive))
        survivors = torch.nonzero(alive).view(-1)
        drift: list[torch.Tensor] = []  # (new - old) / sqrt(age) of the channels re-scored this round
        scored = [0]

        def rescore(idx: torch.Tensor) -> None:
            if idx.numel():
                scored[0] += idx.numel()
                new = joint.removals(keep, idx)
                drift.append((new - values[idx]) / (r - scored_at[idx]).double().sqrt())
                values[idx] = new
                scored_at[idx] = r

        if r == 0 and exact_initial:
            pass
        elif not screen:
            rescore(survivors)
        else:
            w = max(min_band, math.ceil(band * n_alive))
            rescore(_lowest(values, survivors, b + w))
            while True:
                stale = survivors[scored_at[survivors] < r]
                if not stale.numel():
                    break
                chosen = _lowest(values, survivors[scored_at[survivors] == r], b)
                threshold = float(values[chosen].max())
                mu, sigma = _calibration(torch.cat(drift))
                if not math.isfinite(sigma):  # too few re-scored channels to trust the screen: double the band
                    w *= 2
                    rescore(_lowest(values, stale, min(stale.numel(), w)))
                    continue
                # a value scored `age` rounds ago drifts like a random walk: mean and spread grow with sqrt(age)
                age = (r - scored_at[stale]).double().sqrt()
                close = stale[values[stale] + (mu - z * sigma) * age <= threshold]
                if not close.numel():
                    break
                rescore(close)
        fresh = survivors[scored_at[survivors] == r]
        chosen = _lowest(values, fresh, b)
        alive[chosen] = False
        keep[chosen] = 0.0
        rounds.append({"removed": chosen.tolist(), "scores": values[chosen].tolist(), "alive_before": n_alive,
                       "scored": scored[0], "joint_kl": joint.current(keep)})
        if on_round is not None:
            on_round(rounds)
    return {"rounds": rounds, "survivors": torch.nonzero(alive).view(-1).tolist(),
            "survivor_values": values[alive].tolist()}


class _State:
    """Finished rounds per site, persisted as JSON (atomically) under a fingerprint of the run."""

    def __init__(self, path: str | None, adapter: Adapter, images: Inputs, values: dict[str, torch.Tensor],
                 options: dict[str, Any]) -> None:
        import json
        import os

        from ..fingerprint import digest
        from .kl import fingerprint

        self.path = path
        self.data: dict[str, Any] = {"format": "upvit-greedy-state", "sites": {}}
        if path is None:
            return
        named = ((f"{name}|{t.dtype}|{list(t.shape)}", t) for name, t in sorted(values.items()))
        self.data["fingerprint"] = digest([fingerprint(adapter, images, options), *(p for pair in named for p in pair)]
                                          ).hexdigest()
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old.get("fingerprint") != self.data["fingerprint"]:
                raise UpvitError(f"{path} holds greedy rounds of another model, proxy set, initial scores or options: "
                                 "delete it or give another state_path")
            self.data = old

    def rounds(self, key: str) -> list[dict[str, Any]]:
        return list(self.data["sites"].get(key, []))

    def save(self, key: str, rounds: list[dict[str, Any]]) -> None:
        if self.path is None:
            return
        from ..io import atomic_write_json

        self.data["sites"][key] = rounds
        atomic_write_json(self.path, self.data)


def _matches(joint: JointKL, values: torch.Tensor, probes: int = 8) -> bool:
    """Whether ``values`` are this model's exact one-shot scores on these inputs: the ``probes``
    lowest (the first round's candidates) are scored again and must agree to float precision."""
    idx = _lowest(values.detach().to(torch.float64).cpu(), torch.arange(values.numel()), min(probes, values.numel()))
    again = joint.removals(torch.ones(values.numel(), dtype=torch.float64), idx)
    return bool(torch.allclose(again, values.detach().to(torch.float64).cpu()[idx], rtol=1e-5, atol=1e-9))


def order_values(size: int, path: dict[str, Any]) -> torch.Tensor:
    """Values whose top-k at every width of the path is the greedy set (see the module doc)."""
    out = torch.empty(size, dtype=torch.float64)
    for r, rnd in enumerate(path["rounds"]):
        removed = torch.tensor(rnd["removed"], dtype=torch.long)
        ranks = torch.argsort(torch.tensor(rnd["scores"], dtype=torch.float64), stable=True)
        out[removed[ranks]] = r + (torch.arange(len(removed), dtype=torch.float64) + 1) / (len(removed) + 1)
    alive = torch.tensor(path["survivors"], dtype=torch.long)
    ranks = torch.argsort(torch.tensor(path["survivor_values"], dtype=torch.float64), stable=True)
    out[alive[ranks]] = len(path["rounds"]) + (torch.arange(len(alive), dtype=torch.float64) + 1) / (len(alive) + 1)
    return out


@register_method("greedy")
def greedy_scores(adapter: Adapter, images: Inputs, targets: Any = None, ratios: Any = None,
                  initial: Scores | None = None, batch: int = 16, screen: bool = False, band: float = 0.1,
                  min_band: int = 4, z: float = 3.0, batch_size: int = 64, candidate_batch: int | None = None,
                  progress: bool = True, state_path: str | None = None, **meta: Any) -> Scores:
    """Scores whose residual keep sets at ``targets`` (or ``ratios``) are the greedy joint-removal
    choice (module doc); the other sites carry ``initial`` (or exact one-shot KL scores).

    ``state_path``: a JSON file where the finished rounds are written after each round; a run that
    finds it (for the same model, inputs, initial scores and options) replays them and continues.
    ``progress``: one bar for the whole job (one-shot scores if computed here, every round) and a first
    line with the plan (rounds per residual site, evaluations).

    >>> s = upvit.score(teacher, proxy, method="greedy", initial=one_shot,              # doctest: +SKIP
    ...                 targets=[dict(embed_dim=96, num_heads=6, mlp_hidden=384),
    ...                          dict(embed_dim=48, num_heads=3, mlp_hidden=192)])
    >>> plan = upvit.make_plan(teacher, s, embed_dim=48, num_heads=3, mlp_hidden=192)  # doctest: +SKIP
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UpvitError(f"batch (channels removed per round) must be a positive integer, got {batch!r}")
    if not isinstance(band, (int, float)) or not 0 <= band <= 1:
        raise UpvitError(f"band must be a fraction in [0, 1], got {band!r}")
    if not isinstance(min_band, int) or min_band < 0:
        raise UpvitError(f"min_band must be a non-negative integer, got {min_band!r}")
    if not isinstance(z, (int, float)) or z < 0:
        raise UpvitError(f"z must be a non-negative number, got {z!r}")
    if (targets is None) == (ratios is None):
        raise UpvitError("method 'greedy' needs exactly one of targets=[{embed_dim, num_heads, mlp_hidden}, ...] "
                         "or ratios=[0.5, ...]: the residual widths its path must pass through")
    with job("greedy", unit="img-fwd", show=progress, estimate=False) as bar:
        return _greedy(adapter, images, targets, ratios, initial, batch, screen, band, min_band, z, batch_size,
                       candidate_batch, progress, state_path, meta, bar)


def _greedy(adapter: Adapter, images: Inputs, targets: Any, ratios: Any, initial: Scores | None, batch: int,
            screen: bool, band: float, min_band: int, z: float, batch_size: int, candidate_batch: int | None,
            progress: bool, state_path: str | None, meta: dict[str, Any], bar: Any) -> Scores:
    t0 = time.perf_counter()
    topology = adapter.topology()
    target_list = Targets.parse_many(topology, targets, ratios, method="greedy")
    computed = initial is None
    n = batch_len(images)
    plan, work = [], 0.0
    for site in topology.sites_of("residual"):
        widths = [t.stages[site.stage].residual for t in target_list]
        rounds, evaluations = path_evaluations(site.size, widths, batch, first_round=not computed)
        # + the reference pass, the one-shot comparison at each width and the check of the given scores
        evaluations += 1 + len(set(widths)) + (0 if computed else 8)
        plan.append(f"{site.key}: {rounds} round{'s' if rounds != 1 else ''} of up to {batch} channels down to "
                    f"{min(widths)}")
        work += evaluations * n * evaluation_cost(topology, site.key)
    note(f"greedy residual selection, {'; '.join(plan)}: at most {work:,.0f} forward passes of the model over the "
         f"{n:,} proxy {samples_word(images)}{' (fewer with screen=True)' if screen else ''}"
         f"{', after exact one-shot scores of every channel' if computed else ''}", progress)
    bar.extend(work)
    if initial is None:
        bar.phase("exact one-shot scores")
        initial = kl_scores(adapter, images, batch_size=batch_size, progress=progress)
    elif not isinstance(initial, Scores):
        raise UpvitError("initial must be upvit Scores (e.g. the exact one-shot KL scores), "
                         f"got {type(initial).__name__}")
    initial.check_matches(topology)
    bar.arm()
    values = {k: v.detach().to(torch.float64).cpu().clone() for k, v in initial.items()}
    state = _State(state_path, adapter, images, values, {"targets": [t.to_dict() for t in target_list], "batch": batch,
                                                         "screen": screen, "band": band, "min_band": min_band, "z": z,
                                                         "batch_size": batch_size})
    model = adapter.model
    was_training = model.training
    model.eval()
    paths: dict[str, Any] = {}
    evaluations = 0
    try:
        reference = Reference(adapter, images, batch_size)  # the original's outputs, once for every site
        for site in topology.sites_of("residual"):
            bar.phase(f"greedy rounds on {site.key}")
            widths = [t.stages[site.stage].residual for t in target_list]
            joint = JointKL(adapter, images, site.key, batch_size, candidate_batch, reference)
            joint.bar = bar
            joint._count(1)  # the reference pass
            exact_initial = computed or _matches(joint, values[site.key])
            if exact_initial and not computed:  # the given scores are exact: the first round is not scored
                bar.extend(-site.size * n * joint.cost)
            done = state.rounds(site.key)
            if done:  # replayed rounds: their evaluations are not run again
                replayed = sum(r["alive_before"] for r in done[1 if exact_initial else 0:]) + len(done)
                bar.extend(-replayed * n * joint.cost)
            path = greedy_path(joint, widths, values[site.key], batch, screen, band, min_band, z, exact_initial,
                               done=done, on_round=lambda rounds, key=site.key: state.save(key, rounds))
            path["initial_exact"] = exact_initial
            # the one-shot choice's joint divergence at each width, for comparison
            one_shot = {}
            for w in sorted(set(widths), reverse=True):
                keep = torch.zeros(site.size, dtype=torch.float64)
                keep[_lowest(-values[site.key], torch.arange(site.size), w)] = 1.0
                one_shot[w] = joint.current(keep)
            path["one_shot_joint_kl"] = one_shot
            values[site.key] = order_values(site.size, path)
            evaluations += joint.evaluations
            paths[site.key] = path
    finally:
        model.train(was_training)
    info = {**meta, "criterion": Reference.criterion_of(adapter), "divergence": adapter.divergence,
            "method": "greedy", "greedy": paths, "batch": batch, "screen": screen,
            "band": band, "min_band": min_band, "z": z, "targets": [t.to_dict() for t in target_list],
            "initial": {k: initial.meta.get(k) for k in ("criterion", "method", "num_images", "fingerprint")},
            "exact_evaluations": evaluations, "num_images": batch_len(images),
            "values": "residual sites: greedy order codes (round r in (r, r+1), survivors above); other sites: initial",
            "model": adapter.describe(), "wall_time_s": round(time.perf_counter() - t0, 3)}
    return Scores.from_sites(topology, values, info)


__all__ = ["JointKL", "greedy_path", "greedy_scores", "order_values"]
