"""Plan + model -> a genuine smaller model of the same family (docs/method.md section 3).

The family-independent driver: validate the plan against the model and the family's rules (once, here:
``Adapter.rebuild`` may assume a checked plan), let the family's adapter build
the new model through the family's own constructor and slice every tensor that carries a pruned
channel (and, for a plan that removes units, re-pair the remaining attention and FFN units into
ordinary blocks: :meth:`upvit.topology.Topology.rebuilt_blocks`), then check the result has the
planned shape. No masks or patched forwards are left behind,
and the original model is not modified.

Attention scale: the pruned attention uses its own ``head_dim ** -0.5`` (so fused and unfused
attention agree); where the kept per-head dim differs from the original, the adapter folds
``sqrt(new_head_dim / old_head_dim)`` into the q projection, which keeps the original model's
scale exactly (the pruned model equals the masked original).

>>> import upvit
>>> plan = upvit.make_plan(model, scores, embed_dim=384, num_heads=6, mlp_hidden=1536)  # doctest: +SKIP
>>> small = upvit.prune(model, plan)                                                    # doctest: +SKIP
>>> upvit.save(small, "runs/pruned")                                                    # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .errors import UpvitError
from .plan import Plan


def prune(model: nn.Module, plan: Plan, compensate: str = "none", proxy: Any = None) -> nn.Module:
    """A new model of ``model``'s family at ``plan``'s shape, with sliced weights.

    ``compensate`` ("none", the paper's; "bias"; "lsq"): then refit the layers that read pruned channels
    on ``proxy`` (the scoring proxy: images ``[N, C, H, W]`` or a dict of token tensors) so that they
    reproduce the original's outputs (:mod:`upvit.compensation`); the report goes to
    ``upvit_config.extra["compensation"]``.

    The result carries ``upvit_config`` (rebuildable by ``upvit.load`` after ``upvit.save``) whose
    ``extra["plan"]`` is the plan as JSON data and whose ``timm_equivalent`` names a registered timm
    architecture of the same shape, if any. ``model``'s own record (its training run, its plan ...)
    moves under ``extra["source"]`` (:mod:`upvit.provenance`): it describes the model pruned, not the result.
    """
    from .adapters import get_adapter
    from .compensation import check_mode

    check_mode(compensate)
    if compensate != "none" and proxy is None:
        raise UpvitError(f"compensate={compensate!r} refits layers on proxy samples: give proxy= (the scoring proxy "
                         "images), or compensate='none'")
    if not isinstance(plan, Plan):
        raise UpvitError(f"prune needs a upvit.Plan, got {type(plan).__name__}: build one with upvit.make_plan "
                         "or Plan.from_json")
    adapter = get_adapter(model)
    topology = adapter.topology()
    plan.check_fits(topology)  # the one check of a plan in surgery: structure, then the family's rules
    adapter.check_plan(plan)
    new, config = adapter.rebuild(plan)
    got = get_adapter(new).topology().shape()
    want = plan.target_shape()
    for key in ("residual", "depths", "heads", "attn", "ffn"):
        if key in want and got[key] != want[key]:  # an adapter bug, not a user error
            raise AssertionError(f"the pruned model has {key}={got[key]}, the plan asks for {want[key]}")
    from .provenance import SOURCE_KEY, run_record

    own = ("timm_equivalent_kwargs", "hf_spec")  # the rebuilt model's own keys (the adapter set them)
    parent = getattr(model, "upvit_config", None)
    config.extra = {k: v for k, v in config.extra.items() if k in own}
    source = run_record(parent.extra, keep=own) if parent is not None else {}
    if source:
        config.extra[SOURCE_KEY] = source
    config.extra["plan"] = plan.to_dict()
    new.upvit_config = config
    if compensate != "none":
        from .compensation import compensate as refit

        report = refit(model, new, plan, proxy, mode=compensate)
        config.extra["compensation"] = {**report.to_dict(), "summary": report.summary()}
    return new


__all__ = ["prune"]
