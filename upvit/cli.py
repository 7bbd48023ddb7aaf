"""The ``upvit`` command: thin argument parsing over the library."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from .errors import UpvitError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def _add_model_args(p: argparse.ArgumentParser, name: str = "model", nargs=None) -> None:
    p.add_argument(name, nargs=nargs, help="model directory (config.json + model.safetensors) or timm:NAME[,key=value,...]")
    p.add_argument("--checkpoint", help="state dict (.safetensors or .pth) to load into the model")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Options every training run shares (train and finetune)."""
    p.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the weights (e.g. 0.999)")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16"])
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")


# ----------------------------------------------------------------------------------------- train
@command("train")
def cmd_train(args: argparse.Namespace) -> int:
    import copy

    from .data import load_data
    from .models import load_model
    from .train import TrainConfig, fit

    model = load_model(args.model, args.checkpoint)
    train_ds, info = load_data(args.data, train=True, seed=args.seed)
    config = model.upvit_config
    config.data_config = info.data_config()
    config.class_names = info.class_names
    val_ds = load_data(args.val_data, data_config=config.data_config)[0] if args.val_data else None
    if getattr(model, "num_classes", info.num_classes) != info.num_classes:
        raise UpvitError(f"the model has {model.num_classes} classes but the data has {info.num_classes}: "
                         f"add num_classes={info.num_classes} to the timm spec")
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                      weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                      label_smoothing=args.label_smoothing, ema_decay=args.ema_decay, seed=args.seed,
                      num_workers=args.workers, amp=args.amp, max_steps_per_epoch=args.max_steps_per_epoch)
    if args.drop_path:
        _set_drop_path(model, args.drop_path)
    record = fit(model, train_ds, cfg, args.out, val_data=val_ds, resume=args.resume,
                 extra_config={"command": " ".join(["upvit", *sys.argv[1:]])})
    print(f"wrote {args.out}: " + json.dumps({k: record.get(k) for k in ("epoch", "val_top1", "val_loss")}))
    return 0


def _set_drop_path(model, rate: float) -> None:
    """Stochastic depth, linearly increasing with depth (timm's rule), without rebuilding."""
    from .adapters import get_adapter

    setter = getattr(get_adapter(model), "set_drop_path", None)
    if setter is None:
        raise UpvitError("--drop-path is available for timm ViT/DeiT models only: give the family's own "
                         "constructor argument in the model spec instead (e.g. timm:NAME,drop_path_rate=0.1)")
    setter(rate)


def _train_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--data", required=True, help="training data: animal-mnist:train or an ImageFolder directory")
    p.add_argument("--val-data", help="validation data evaluated after every epoch")
    p.add_argument("--out", required=True, help="output directory (model, checkpoint, log.jsonl)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128, help="global batch size (split over torchrun ranks)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=2.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the last block")
    _add_run_args(p)


# -------------------------------------------------------------------------------------- finetune
@command("finetune")
def cmd_finetune(args: argparse.Namespace) -> int:
    from .data import load_data
    from .distill import check_teacher, finetune
    from .models import load_model
    from .train import TrainConfig

    student = load_model(args.model, args.checkpoint)
    teacher = load_model(args.teacher, args.teacher_checkpoint)
    check_teacher(student, teacher)
    data_config = student.upvit_config.data_config or None
    train_ds, info = load_data(args.data, data_config=data_config, train=True, seed=args.seed)
    if getattr(student, "num_classes", info.num_classes) != info.num_classes:
        raise UpvitError(f"the model has {student.num_classes} classes but the data {args.data!r} has {info.num_classes}")
    val_ds = load_data(args.val_data, data_config=data_config)[0] if args.val_data else None
    lr = args.lr if args.lr is not None else 1e-3 * args.batch_size / 256  # public recipe: 1e-3 at batch 256
    warmup = args.warmup_epochs if args.warmup_epochs is not None else min(2.0, 0.1 * args.epochs)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr, min_lr=args.min_lr,
                      weight_decay=args.weight_decay, warmup_epochs=warmup, ema_decay=args.ema_decay, seed=args.seed,
                      num_workers=args.workers, amp=args.amp, max_steps_per_epoch=args.max_steps_per_epoch)
    record = finetune(student, teacher, train_ds, cfg, args.out, alpha=args.alpha, temperature=args.temperature,
                      val_data=val_ds, resume=args.resume, teacher_name=args.teacher,
                      extra_config={"command": " ".join(["upvit", *sys.argv[1:]])})
    print(f"wrote {args.out}: " + json.dumps({k: record.get(k) for k in ("epoch", "train_loss", "val_top1", "val_loss")}))
    return 0


def _finetune_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--teacher", required=True, help="the original (unpruned) model: directory or timm:NAME")
    p.add_argument("--teacher-checkpoint", help="state dict to load into the teacher")
    p.add_argument("--data", required=True, help="training data: animal-mnist:train or an ImageFolder directory")
    p.add_argument("--val-data", help="validation data evaluated after every epoch")
    p.add_argument("--out", required=True, help="output directory (model, checkpoint, log.jsonl)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the batch-mean KL(teacher || student) term")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the KL term (x T^2)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size (split over torchrun ranks)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3 x batch / 256)")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up (default min(2, epochs / 10))")
    _add_run_args(p)


# ------------------------------------------------------------------------------------------ eval
@command("eval")
def cmd_eval(args: argparse.Namespace) -> int:
    from .data import load_data
    from .evaluation import evaluate
    from .models import load_model

    model = load_model(args.model, args.checkpoint)
    dataset, _ = load_data(args.data, data_config=model.upvit_config.data_config)
    metrics = evaluate(model, dataset, batch_size=args.batch_size, device=args.device)
    print(f"top-1 {metrics['top1']:.2f}%  loss {metrics['loss']:.4f}  ({metrics['n']} images)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "data": args.data, **metrics}, f, indent=2)
    return 0


def _eval_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--data", required=True, help="animal-mnist:val or an ImageFolder directory")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--json", help="also write the metrics to this JSON file")


# ----------------------------------------------------------------------------------------- bench
@command("bench")
def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import describe, format_table
    from .models import load_model

    rows = []
    for spec in args.models:
        model = load_model(spec, args.checkpoint if len(args.models) == 1 else None)
        rows.append(describe(model, spec, batch_size=args.batch_size, runs=args.runs, device=args.device))
    print(format_table(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _bench_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p, "models", nargs="+")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--runs", type=int, default=10, help="timed runs; the median is reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the rows as JSON here")


# ------------------------------------------------------------------------------------------ prune
@command("prune")
def cmd_prune(args: argparse.Namespace) -> int:
    from .bench import count_macs, count_params
    from .importance.scores import Scores
    from .io import save
    from .models import load_model
    from .plan import Plan, make_plan
    from .surgery import prune

    targets = {"embed_dim": args.embed_dim, "num_heads": args.num_heads, "mlp_hidden": args.mlp_hidden,
               "attn_dim": args.attn_dim}
    given = [k for k, v in targets.items() if v is not None]
    if (args.scores is None) == (args.plan is None):
        raise UpvitError("give exactly one of --scores FILE (with targets) or --plan FILE")
    if args.ratio is not None and given:
        raise UpvitError("give either --ratio or explicit targets (--embed-dim/--num-heads/--mlp-hidden/--attn-dim), not both")
    if args.plan is not None and (given or args.ratio is not None):
        raise UpvitError("--plan already fixes the shape: drop the target options, or use --scores with them")
    model = load_model(args.model, args.checkpoint)
    if args.plan is not None:
        plan = Plan.load(args.plan)
    else:
        if not given and args.ratio is None:
            raise UpvitError("no target given: pass --ratio R or --embed-dim/--num-heads/--mlp-hidden")
        plan = make_plan(model, Scores.load(args.scores), ratio=args.ratio, keep_heads=args.keep_heads,
                         head_bias=args.head_bias, **targets)
    pruned = prune(model, plan)
    save(pruned, args.out)
    plan.save(os.path.join(args.out, "plan.json"))
    p0, p1 = count_params(model), count_params(pruned)
    m0, m1 = count_macs(model), count_macs(pruned)
    print(f"params {p0:,} -> {p1:,} ({p1 / p0:.1%})")
    print(f"MACs   {m0:,} -> {m1:,} ({m1 / m0:.1%})")
    eq = pruned.upvit_config.timm_equivalent
    print(f"wrote {args.out} ({plan.summary()})" + (f"; same architecture as timm {eq}" if eq else ""))
    return 0


def _int_or_list(text: str) -> int | list[int]:
    """``12`` -> 12; ``16,32,64`` -> [16, 32, 64] (one value per stage)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or comma-separated integers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _prune_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scores", help="scores file from `upvit score` (.safetensors)")
    src.add_argument("--plan", help="plan.json to replay (from an earlier prune, or written by hand)")
    p.add_argument("--embed-dim", type=_int_or_list, help="residual width to keep (N, or N1,N2,... one per stage)")
    p.add_argument("--num-heads", type=_int_or_list, help="heads to keep per block (must divide the model's heads; "
                   "one value, or one per stage)")
    p.add_argument("--mlp-hidden", type=_int_or_list, help="FFN hidden units to keep per block (one value, or one per stage)")
    p.add_argument("--attn-dim", type=_int_or_list, help="attention width (default: the embed dim; timm ViT requires that)")
    p.add_argument("--ratio", type=float, help="keep this fraction of embed dims, heads and FFN units")
    p.add_argument("--keep-heads", action="store_true", help="with --ratio: keep the head count, shrink the head dim")
    p.add_argument("--head-bias", default="mean", choices=["mean", "best"],
                   help="Swin: a merged head's relative-position bias is the mean of its heads' or the best head's")
    p.add_argument("--out", required=True, help="output model directory (config.json, model.safetensors, plan.json)")


# ------------------------------------------------------------------------------------------ score
@command("score")
def cmd_score(args: argparse.Namespace) -> int:
    import time

    import torch

    from . import distributed as dist_utils
    from .adapters import get_adapter
    from .data import load_data, sample_proxy
    from .importance.api import LABELLED, get_method, proxy_labels, proxy_tensor, score
    from .models import load_model

    t0 = time.time()
    started = dist_utils.init_if_needed()
    try:
        model = load_model(args.model, args.checkpoint)
        adapter = get_adapter(model)
        get_method(args.method)  # an unknown method fails before any data is read
        dataset, _ = load_data(args.data, data_config=model.upvit_config.data_config or None)
        subset, record = sample_proxy(dataset, size=None if args.per_class else args.proxy_size,
                                      per_class=args.per_class, seed=args.seed)
        images = proxy_tensor(subset, adapter.input_size())
        record["data"] = args.data
        device = torch.device(args.device) if args.device else dist_utils.default_device()
        model.to(device)
        meta = {"model_spec": args.model, "seed": args.seed, "command": " ".join(["upvit", *sys.argv[1:]])}
        options = {"batch_size": args.batch_size}
        if args.method in ("hybrid", "greedy"):
            targets = _parse_targets(args.target)
            if targets is None and args.ratios is None:
                raise UpvitError(f"--method {args.method} needs the target shapes: --target EMBED,HEADS,MLP "
                                 "(repeatable) or --ratios 0.5 0.25")
            options.update({"targets": targets, "ratios": args.ratios})
        elif args.target or args.ratios:
            raise UpvitError("--target and --ratios apply to --method hybrid and greedy only")
        if args.method in LABELLED:  # e.g. taylor: the cross-entropy needs the proxy images' labels
            options["labels"] = proxy_labels(subset)
        scores = score(model, images, method=args.method, out=args.out, resume=args.resume, proxy_meta=record,
                       meta=meta, **options)
        if dist_utils.is_main():
            print(f"wrote {args.out}: {args.method} scores of {sum(t.numel() for _, t in scores.items())} channels "
                  f"on {len(images)} proxy images in {time.time() - t0:.1f}s")
        return 0
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _parse_targets(values: list[str] | None) -> list[dict[str, int]] | None:
    """``["96,6,384", ...]`` -> ``[{"embed_dim": 96, "num_heads": 6, "mlp_hidden": 384}, ...]``."""
    if not values:
        return None
    out = []
    for v in values:
        parts = v.split(",")
        if len(parts) != 3 or not all(x.strip().isdigit() for x in parts):
            raise UpvitError(f"--target {v!r}: write EMBED,HEADS,MLP, e.g. --target 96,6,384")
        out.append(dict(zip(("embed_dim", "num_heads", "mlp_hidden"), (int(x) for x in parts))))
    return out


def _score_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--data", required=True, help="where the proxy set is drawn from: animal-mnist:train or an ImageFolder")
    p.add_argument("--proxy-size", type=int, default=2000, help="random proxy images (seeded)")
    p.add_argument("--per-class", type=int, default=None, help="instead: this many images of every class")
    p.add_argument("--seed", type=int, default=0, help="seed of the proxy sampling")
    p.add_argument("--method", default="kl", help="kl (exact, the paper's), fisher, hybrid, magnitude, random, taylor, greedy")
    p.add_argument("--target", action="append", help="hybrid: a shape EMBED,HEADS,MLP whose keep sets must equal exact's; "
                   "greedy: a shape whose residual width the greedy path passes (repeatable)")
    p.add_argument("--ratios", type=float, nargs="+", help="hybrid: instead of --target, keep ratios such as 0.5 0.25")
    p.add_argument("--batch-size", type=int, default=64, help="proxy images per forward")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", required=True, help="scores file (.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run writing --out")


# ------------------------------------------------------------------------------------------ demo
@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    overrides = {k: v for k, v in {"out": args.out, "teacher": args.teacher, "epochs": args.epochs,
                                   "proxy_size": args.proxy_size, "method": args.method}.items() if v is not None}
    cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    run_demo(cfg)
    return 0


def _demo_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a tiny version (seconds to minutes) for tests and smoke checks")
    p.add_argument("--out", default=None, help="output directory (default demo_out)")
    p.add_argument("--teacher", default=None, help="teacher model directory (default: the shipped teacher)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs for every student (default 4)")
    p.add_argument("--proxy-size", type=int, default=None, help="proxy images for scoring (default 32)")
    p.add_argument("--method", default=None, help="scoring method for the UP-ViT students (default hybrid)")


PARSERS = {"train": (_train_parser, "train a timm model from scratch"),
           "finetune": (_finetune_parser, "fine-tune a pruned model with distillation from the original"),
           "eval": (_eval_parser, "top-1 accuracy and loss of a model on a dataset"),
           "bench": (_bench_parser, "parameters, MACs and throughput of models"),
           "score": (_score_parser, "importance of every channel (exact KL by default) on a seeded proxy set"),
           "prune": (_prune_parser, "prune a model to a smaller one of the same family from scores or a plan"),
           "demo": (_demo_parser, "the whole method on the embedded default, with baselines")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upvit", description="Unified structured pruning of vision transformers (UP-ViTs).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, help_text) in PARSERS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UpvitError as e:
        print(f"upvit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("upvit: interrupted; long jobs continue from their last checkpoint with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
