"""The ``upvit`` command: thin argument parsing over the library."""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import Callable

from .cli_support import (
    DefaultsFormatter,
    OneLineParser,
    check_device,
    drop_warnings,
    flush_warnings,
    fraction,
    nonneg_float,
    nonneg_int,
    one_line,
    open_unit,
    positive_float,
    positive_int,
    random_weights_warning,
    rate,
    start_command,
    warn,
)
from .errors import BadImageError, UpvitError
from .outputs import (
    check_json_path,
    check_output_dir,
    check_output_file,
    discard_stale_checkpoint,
    new_paths,
    remove_unfinished,
)
from .provenance import command_line
from .provenance import data_input as _data_input
from .provenance import file_input as _file_input
from .provenance import model_input as _model_input

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}

# one weight-decay default for train, finetune and depth, equal to upvit.TrainConfig's (a test checks it)
WEIGHT_DECAY = 1e-3
WEIGHT_DECAY_HELP = ("AdamW weight decay (the fine-tuning recipe of docs/method.md section 4; the teacher recipes in "
                     "the Makefile pass 0.05)")
DATA_HELP = ("training data: animal-mnist:train, an ImageFolder directory, shakespeare:train or text:FILE_OR_DIR "
             "(text models)")


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def _add_model_args(p: argparse.ArgumentParser, name: str = "model", nargs=None) -> None:
    p.add_argument(name, nargs=nargs,
                   help="model directory (upvit or Hugging Face save_pretrained), timm:NAME[,key=value,...] "
                   "or hf:PATH_OR_NAME[,key=value,...]")
    p.add_argument("--checkpoint", help="state dict (.safetensors or .pth) to load into the model")


def _add_data_args(p: argparse.ArgumentParser, class_map: bool = True) -> None:
    """How an ImageFolder is read: unreadable files, and the data's classes against the model's."""
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip image files that cannot be decoded (counted at the end) instead of stopping at the first")
    if class_map:
        p.add_argument("--class-map", help="when the data's class folders differ from the model's classes: by-name "
                                           "(match folders to the model's class names), "
                                           "FOLDER=CLASS,... or a JSON file")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Options every training run shares (train and finetune)."""
    p.add_argument("--ema-decay", type=open_unit, default=None, help="keep an EMA of the weights (e.g. 0.999)")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16"],
                   help="bfloat16 autocast: auto = on CUDA only")
    p.add_argument("--workers", type=nonneg_int, default=0, help="DataLoader worker processes")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of initialisation, data order and augmentation")
    p.add_argument("--max-steps-per-epoch", type=positive_int, default=None,
                   help="end every epoch after this many optimizer steps (smoke runs, tests, quick comparisons); "
                        "the learning-rate schedule follows the shortened epochs")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out (an earlier run's checkpoint there is discarded)")
    p.add_argument("--json", action="store_true", dest="json_lines",
                   help="print each epoch's record as a JSON line (as in log.jsonl) instead of a readable line")
    p.add_argument("--check-images", action="store_true",
                   help="decode every training/validation image before the first step, so a damaged file stops "
                        "the run before any work instead of in the middle of an epoch")
    _add_data_args(p)


def _check_images(args: argparse.Namespace, train_ds, val_ds) -> None:
    """--check-images: decode every file up front; unreadable ones stop here unless --skip-bad-images."""
    if not args.check_images:
        return
    from .data import image_folders

    for ds in (train_ds, val_ds):
        for folder in image_folders(ds) if ds is not None else []:
            bad = folder.scan()
            if bad and not args.skip_bad_images:
                names = ", ".join(folder.samples[i][0] for i in bad[:3])
                raise UpvitError(f"{len(bad)} unreadable image file{'s' if len(bad) > 1 else ''} under {folder.root} "
                                 f"(first: {names}): replace or remove them, or add --skip-bad-images")


def _fit_or_explain(run, out: str):
    """Run a training function; a damaged image mid-run becomes one line saying how to continue."""
    from .data import SKIP_HINT

    try:
        return run()
    except BadImageError as e:
        message = one_line(str(e)).replace(": " + SKIP_HINT, "")
        log, done = os.path.join(out, "log.jsonl"), 0
        if os.path.isfile(log) and os.path.isfile(os.path.join(out, "checkpoint.pt")):
            with open(log) as f:  # one line per finished epoch, rewritten with every checkpoint
                done = sum(1 for line in f if line.strip())
        if done:
            then = (f"then rerun the same command with --resume: it continues after epoch {done} "
                    f"from the checkpoint in {out}")
        else:
            then = "then rerun the command (no epoch had finished, so there is nothing to resume)"
        raise UpvitError(f"{message}: replace the file with a readable image or add --skip-bad-images, "
                         f"{then}") from None


def _distillation_image_data(args: argparse.Namespace, model, data_config: dict | None):
    """Training and validation image data of a run that distils into ``model`` (finetune, depth): read with
    the model's data config, classes checked against the model's or mapped (--class-map), unreadable files
    refused or skipped (--skip-bad-images), every file decoded up front with --check-images."""
    from .data import align_classes, load_data

    classes, outputs = model.upvit_config.class_names, _num_classes(model, None)
    train_ds, info = load_data(args.data, data_config=data_config, train=True, seed=args.seed,
                               skip_bad_images=args.skip_bad_images)
    if outputs != 0:  # a headless backbone (num_classes=0) is distilled label-free: any image set will do
        train_ds = align_classes(train_ds, info, classes, outputs, args.class_map, repr(args.data))
    val_ds = None
    if args.val_data:
        val_ds, val_info = load_data(args.val_data, data_config=data_config, skip_bad_images=args.skip_bad_images)
        reference = classes if args.class_map else classes or info.class_names  # else: val must match train
        val_ds = align_classes(val_ds, val_info, reference, outputs, args.class_map, repr(args.val_data))
    _check_images(args, train_ds, val_ds)
    return train_ds, val_ds


def _report_unreadable(*datasets) -> None:
    from .data import unreadable_report

    note = unreadable_report(*datasets)
    if note:
        warn(note)


def _train_image_data(args: argparse.Namespace, model):
    """Training and validation image datasets for ``upvit train``, read the way the model wants them
    (its data config decides the transform), with the classes checked (or mapped) against the model's."""
    from .data import align_classes, load_data

    config = model.upvit_config
    train_ds, info = load_data(args.data, data_config=config.data_config or None, train=True, seed=args.seed,
                               skip_bad_images=args.skip_bad_images)
    outputs = _num_classes(model, None)
    if config.class_names or args.class_map:  # a model that already knows its classes, or an explicit map
        train_ds = align_classes(train_ds, info, config.class_names, outputs, args.class_map, repr(args.data))
    elif outputs is not None and outputs != info.num_classes:
        from .models import library_of

        lib = library_of(model)
        raise UpvitError(f"the model has {outputs} classes but the data has {info.num_classes}: "
                         f"add {lib.class_count_key}={info.num_classes} to the {lib.name} spec")
    else:
        config.class_names = info.class_names
    config.data_config = info.data_config()
    val_ds = None
    if args.val_data:
        val_ds, val_info = load_data(args.val_data, data_config=config.data_config,
                                     skip_bad_images=args.skip_bad_images)
        val_ds = align_classes(val_ds, val_info, config.class_names, outputs, args.class_map, repr(args.val_data))
    _check_images(args, train_ds, val_ds)
    return train_ds, val_ds


# ------------------------------------------------------------------------------------ provenance
def _command(args: argparse.Namespace) -> str:
    """The command line of this run (main's argv; the process's when called otherwise)."""
    return command_line(getattr(args, "argv", sys.argv[1:]))


def _run_record(args: argparse.Namespace, inputs: dict, results: dict | None = None) -> dict:
    """What an output records of the run that wrote it (upvit.provenance): command, inputs, results."""
    record = {"command": _command(args), "inputs": {k: v for k, v in inputs.items() if v is not None}}
    if results is not None:
        record["results"] = results
    return record


def _prune_inputs(args: argparse.Namespace, model, scores) -> dict:
    """prune's inputs: the model (as read) and the scores file (with how it was scored) or the plan file."""
    inputs = {"model": _model_input(args.model, model, args.checkpoint)}
    if scores is not None:
        meta = scores.meta or {}
        inputs["scores"] = {**_file_input(args.scores), **{k: meta[k] for k in ("method", "criterion", "proxy",
                                                                                 "command") if k in meta}}
    else:
        inputs["plan"] = _file_input(args.plan)
    return inputs


# ----------------------------------------------------------------------------------------- train
@command("train")
def cmd_train(args: argparse.Namespace) -> int:
    from .data import load_data
    from .models import load_model
    from .train import TrainConfig, fit

    check_output_dir(args.out, force=args.force, resume=args.resume,
                     inputs=[args.model, args.checkpoint, args.data, args.val_data])
    model = load_model(args.model, args.checkpoint, init_seed=args.seed)  # --seed seeds a spec's initialisation
    config = model.upvit_config
    text = _text_kwargs(model)  # text models: their task and tokenizer decide how the data is read
    if text:
        train_ds, info = load_data(args.data, train=True, seed=args.seed, **text)
        config.data_config = info.data_config()
        val_ds = load_data(args.val_data, data_config=config.data_config, tokenizer=text.get("tokenizer"))[0] \
            if args.val_data else None
    else:
        train_ds, val_ds = _train_image_data(args, model)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                      weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                      label_smoothing=args.label_smoothing, ema_decay=args.ema_decay, seed=args.seed,
                      num_workers=args.workers, amp=args.amp, max_steps_per_epoch=args.max_steps_per_epoch,
                      grad_clip=args.grad_clip)
    if args.drop_path:
        _set_drop_path(model, args.drop_path)
    if args.force and not args.resume:
        discard_stale_checkpoint(args.out)
    record_ = _run_record(args, {"model": _model_input(args.model, model, args.checkpoint),
                                 "data": _data_input(args.data, train_ds),
                                 "val_data": _data_input(args.val_data, val_ds)})
    flush_warnings()
    record = _fit_or_explain(lambda: fit(model, train_ds, cfg, args.out, val_data=val_ds, resume=args.resume,
                                         extra_config=record_), args.out)
    _report_unreadable(train_ds, val_ds)
    print(f"wrote {args.out}: " + json.dumps({k: record.get(k)
                                              for k in ("epoch", "val_top1", "val_loss", "val_perplexity")
                                              if k in record or k != "val_perplexity"}))
    return 0


def _num_classes(model, default):
    """A classifier's class count: timm's ``num_classes``, transformers' ``config.num_labels`` (image
    classifiers); ``default`` for models without classes (text)."""
    from .models import num_classes

    found = num_classes(model)
    return default if found is None else found


def _text_kwargs(model) -> dict:
    """``load_data`` arguments of a text model (its task and tokenizer); {} for an image model."""
    from .adapters import task_of
    from .tasks import is_text

    if is_text(task_of(model)):
        return {"data_config": model.upvit_config.data_config, "tokenizer": getattr(model, "upvit_tokenizer", None)}
    return {}


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
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--val-data", help="validation data evaluated after every epoch")
    p.add_argument("--out", required=True, help="output directory (model, checkpoint, log.jsonl)")
    p.add_argument("--epochs", type=positive_int, default=30, help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=128, help="global batch size (split over torchrun ranks)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr", type=nonneg_float, default=1e-5, help="learning rate at the end of the cosine")
    p.add_argument("--weight-decay", type=nonneg_float, default=WEIGHT_DECAY, help=WEIGHT_DECAY_HELP)
    p.add_argument("--warmup-epochs", type=nonneg_float, default=2.0, help="linear warm-up from 0")
    p.add_argument("--label-smoothing", type=rate, default=0.1, help="label smoothing of the cross-entropy")
    p.add_argument("--drop-path", type=rate, default=0.0, help="stochastic depth rate of the last block")
    p.add_argument("--grad-clip", type=positive_float, default=None, help="clip the gradient norm to this value")
    _add_run_args(p)


# -------------------------------------------------------------------------------------- finetune
@command("finetune")
def cmd_finetune(args: argparse.Namespace) -> int:
    from .data import load_data
    from .distill import check_teacher, finetune
    from .models import load_model
    from .train import TrainConfig

    check_output_dir(args.out, force=args.force, resume=args.resume,
                     inputs=[args.model, args.checkpoint, args.teacher, args.teacher_checkpoint, args.data,
                             args.val_data])
    student = load_model(args.model, args.checkpoint)
    random_weights_warning(args.model, args.checkpoint)
    teacher = load_model(args.teacher, args.teacher_checkpoint)
    random_weights_warning(args.teacher, args.teacher_checkpoint, "--teacher-checkpoint")
    check_teacher(student, teacher)
    data_config = student.upvit_config.data_config or None
    tokenizer = getattr(student, "upvit_tokenizer", None) or getattr(teacher, "upvit_tokenizer", None)
    if _text_kwargs(student):  # text: the student's task and tokenizer decide how the data is read
        train_ds, info = load_data(args.data, data_config=data_config, train=True, seed=args.seed, tokenizer=tokenizer)
        val_ds = load_data(args.val_data, data_config=data_config, tokenizer=tokenizer)[0] if args.val_data else None
    else:
        train_ds, val_ds = _distillation_image_data(args, student, data_config)
    lr = args.lr if args.lr is not None else 1e-3 * args.batch_size / 256  # public recipe: 1e-3 at batch 256
    warmup = args.warmup_epochs if args.warmup_epochs is not None else min(2.0, 0.1 * args.epochs)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr, min_lr=args.min_lr,
                      weight_decay=args.weight_decay, warmup_epochs=warmup, ema_decay=args.ema_decay, seed=args.seed,
                      num_workers=args.workers, amp=args.amp, max_steps_per_epoch=args.max_steps_per_epoch,
                      grad_clip=args.grad_clip)
    if args.force and not args.resume:
        discard_stale_checkpoint(args.out)
    flush_warnings()
    record = _fit_or_explain(lambda: finetune(
        student, teacher, train_ds, cfg, args.out, alpha=args.alpha, temperature=args.temperature, val_data=val_ds,
        resume=args.resume, teacher_name=args.teacher, extra_config=_run_record(args, {
            "model": _model_input(args.model, student, args.checkpoint),
            "teacher": _model_input(args.teacher, teacher, args.teacher_checkpoint),
            "data": _data_input(args.data, train_ds), "val_data": _data_input(args.val_data, val_ds)}),
        distill=args.distill),
        args.out)
    _report_unreadable(train_ds, val_ds)
    print(f"wrote {args.out}: " + json.dumps({k: record.get(k) for k in ("epoch", "train_loss", "val_top1", "val_loss",
                                                                         "val_perplexity") if k in record}))
    from . import distributed as dist_utils

    if dist_utils.is_main():
        from .io import load

        _certify(args, load(args.out), source=teacher, proxy=None)
    return 0


def _finetune_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--teacher", required=True, help="the original (unpruned) model: a model directory, timm:NAME or "
                   "hf:PATH_OR_NAME")
    p.add_argument("--teacher-checkpoint", help="state dict to load into the teacher")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--val-data", help="validation data evaluated after every epoch")
    p.add_argument("--out", required=True, help="output directory (model, checkpoint, log.jsonl)")
    p.add_argument("--epochs", type=positive_int, default=30, help="fine-tuning epochs")
    p.add_argument("--alpha", type=nonneg_float, default=1.0,
                   help="weight of the distillation term (batch-mean KL, or the "
                   "MSE with --distill features)")
    p.add_argument("--distill", default="logits", choices=["logits", "features"],
                   help="logits: KL(teacher || student) (default); features: --alpha x MSE on the pooled penultimate "
                        "features, the teacher's read at the channels the student's plan kept (the paper's PVTv2 "
                        "setting, alpha 20). A headless backbone (num_classes=0) takes features only: --alpha x MSE "
                        "on its output embedding, no CE, the data's labels unused (no --val-data: measure it with "
                        "upvit eval --knn-train)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="softmax temperature of the KL term (x T^2)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="global batch size (split over torchrun ranks)")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default 1e-3 x batch / 256)")
    p.add_argument("--min-lr", type=nonneg_float, default=1e-5, help="learning rate at the end of the cosine")
    p.add_argument("--weight-decay", type=nonneg_float, default=WEIGHT_DECAY, help=WEIGHT_DECAY_HELP)
    p.add_argument("--warmup-epochs", type=nonneg_float, default=None,
                   help="linear warm-up (default min(2, epochs / 10))")
    p.add_argument("--grad-clip", type=positive_float, default=None, help="clip the gradient norm to this value")
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx, checked for ONNX Runtime parity (report)")
    _add_run_args(p)


# ------------------------------------------------------------------------------------------ eval
@command("eval")
def cmd_eval(args: argparse.Namespace) -> int:
    from .data import align_classes, load_data
    from .evaluation import evaluate
    from .io import atomic_write_json
    from .models import load_model

    check_device(args.device)
    check_json_path(args.json)
    model = load_model(args.model, args.checkpoint)
    random_weights_warning(args.model, args.checkpoint)
    from .adapters import task_of
    from .tasks import Task

    if args.knn_train or _num_classes(model, None) == 0:
        return _eval_knn(args, model)
    if _text_kwargs(model):
        dataset, _ = load_data(args.data, data_config=model.upvit_config.data_config,
                               tokenizer=getattr(model, "upvit_tokenizer", None))
    else:
        dataset, info = load_data(args.data, data_config=model.upvit_config.data_config,
                                  skip_bad_images=args.skip_bad_images)
        dataset = align_classes(dataset, info, model.upvit_config.class_names, _num_classes(model, None),
                                args.class_map, repr(args.data))
    if args.teacher and task_of(model) != Task.SENTENCE_EMBEDDING:
        raise UpvitError("--teacher applies to sentence encoders only")
    if task_of(model) == Task.SENTENCE_EMBEDDING and not args.teacher:
        raise UpvitError("a sentence encoder is evaluated against its teacher: add --teacher MODEL")
    flush_warnings()
    if task_of(model) == Task.SENTENCE_EMBEDDING:  # no labels: how well the teacher's similarities are kept
        from .text import embedding_agreement

        metrics = embedding_agreement(model, load_model(args.teacher), dataset, max_sentences=args.max_sentences,
                                      batch_size=args.batch_size, device=args.device)
        print(f"similarity Spearman {metrics['spearman']:.4f}  nearest-neighbour agreement "
              f"{metrics['nn_agreement']:.4f}  ({metrics['sentences']} sentences, {metrics['pairs']} pairs)")
    else:
        metrics = evaluate(model, dataset, batch_size=args.batch_size, device=args.device)
        _report_unreadable(dataset)
        if "perplexity" in metrics:
            print(f"perplexity {metrics['perplexity']:.3f}  loss {metrics['loss']:.4f}  next-token top-1 "
                  f"{metrics['top1']:.2f}%  ({metrics['n']} tokens)")
        else:
            print(f"top-1 {metrics['top1']:.2f}%  loss {metrics['loss']:.4f}  ({metrics['n']} images)")
    if args.json:
        atomic_write_json(args.json, {"model": args.model, "data": args.data, **metrics})  # creates the folder
    return 0


def _eval_knn(args: argparse.Namespace, model) -> int:
    """--knn-train: kNN@k top-1 of the model's features (a backbone, pruned or not; a classifier's pre-logits),
    the --data images labelled by their k nearest --knn-train images (cosine); the model's classes unused."""
    from .data import load_data
    from .io import atomic_write_json
    from .probe import knn_eval

    if _text_kwargs(model):
        raise UpvitError("--knn-train evaluates image backbones: this is a text model")
    if not args.knn_train:
        raise UpvitError("this backbone has no classifier (num_classes=0): measure its features by kNN with "
                         "--knn-train TRAIN_DATA (e.g. --data emoji:val --knn-train emoji:train)")
    cfg = model.upvit_config.data_config
    val, info = load_data(args.data, data_config=cfg, skip_bad_images=args.skip_bad_images)
    train, train_info = load_data(args.knn_train, data_config=cfg, skip_bad_images=args.skip_bad_images)
    if list(train_info.class_names) != list(info.class_names):
        raise UpvitError(f"--knn-train {args.knn_train} and --data {args.data} have different classes: use two "
                         "splits of the same labelled set")
    flush_warnings()
    metrics = knn_eval(model, train, val, k=args.knn_k, batch_size=args.batch_size, device=args.device)
    _report_unreadable(val, train)
    print(f"kNN@{metrics['k']} top-1 {metrics['knn_top1']:.2f}%  ({metrics['n']} images, {metrics['train_images']} "
          f"neighbours to choose from, {metrics['feature_dim']} features)")
    if args.json:
        atomic_write_json(args.json, {"model": args.model, "data": args.data, "knn_train": args.knn_train, **metrics})
    return 0


def _eval_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--data", required=True,
                   help="animal-mnist:val, an ImageFolder directory, shakespeare:val or text:FILE")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images (or text blocks) per forward")
    p.add_argument("--teacher", help="sentence encoders: the model whose sentence similarities should be kept")
    p.add_argument("--max-sentences", type=positive_int, default=1000,
                   help="sentence encoders: sentences compared (first N)")
    p.add_argument("--knn-train", help="image backbones (a headless model needs it): instead of top-1 of the "
                   "classifier, kNN top-1 of the model's features: each --data image gets the majority label of its "
                   "--knn-k most cosine-similar images of this labelled set (same classes as --data)")
    p.add_argument("--knn-k", type=positive_int, default=10, help="neighbours voting in --knn-train (kNN@k)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--json", help="also write the metrics to this JSON file (its folder is created)")
    _add_data_args(p)


# ----------------------------------------------------------------------------------------- bench
@command("bench")
def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import describe_many, format_table, spread_warning
    from .models import load_model

    check_device(args.device)
    check_json_path(args.json)
    device = args.device or str(_default_device())  # the same default as every other command
    if args.runtime == "onnxruntime":  # upvit runs ONNX Runtime's CPU provider
        if args.device not in (None, "cpu"):
            raise UpvitError(f"--runtime onnxruntime runs on the CPU, not {args.device}: use --device cpu")
        device = "cpu"
    models = [(spec, load_model(spec, args.checkpoint if len(args.models) == 1 else None)) for spec in args.models]
    rows = describe_many(models, batch_size=args.batch_size, runs=args.runs, device=device, runtime=args.runtime)
    print(format_table(rows))
    note = spread_warning(rows)
    if note:
        warn(note)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _bench_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p, "models", nargs="+")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per timed forward")
    p.add_argument("--runs", type=positive_int, default=10,
                   help="timed runs per model, taking turns between models after 3 untimed warm-up runs each; the "
                        "median, interquartile range and min-max are reported, with a warning when the range is wide")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"],
                   help="torch: PyTorch eager; onnxruntime: the model exported to ONNX (upvit export), run by ONNX "
                        "Runtime on the CPU with as many threads as torch uses")
    p.add_argument("--json", help="write the rows as JSON here")


# ------------------------------------------------------------------------------------------ prune
@command("prune")
def cmd_prune(args: argparse.Namespace) -> int:
    from .bench import count_macs, count_params
    from .fingerprint import check_scores_fingerprint
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
        raise UpvitError("give either --ratio or explicit targets (--embed-dim/--num-heads/--mlp-hidden/--attn-dim), "
                         "not both")
    if args.plan is not None and (given or args.ratio is not None):
        raise UpvitError("--plan already fixes the shape: drop the target options, or use --scores with them")
    if args.budget is not None:
        if args.plan is not None or given or args.ratio is not None:
            raise UpvitError("--budget chooses the shape: drop --plan/--ratio/--embed-dim/--num-heads/--mlp-hidden/"
                             "--attn-dim, or drop --budget")
        if not args.data:
            raise UpvitError("--budget compares the candidate shapes on a proxy set: add --data (e.g. "
                             "--data animal-mnist:train)")
    elif args.plan is None and not given and args.ratio is None:
        raise UpvitError("no target given: pass --ratio R, --embed-dim/--num-heads/--mlp-hidden or --budget "
                         "KIND=FRACTION")
    if args.compensate != "none" and not args.data:
        raise UpvitError(f"--compensate {args.compensate} refits layers on a proxy set: add --data (the data `upvit "
                         "score` used, e.g. --data animal-mnist:train)")
    if args.heads != "merge" and (args.plan is not None or args.budget is not None):
        raise UpvitError("--heads applies when the plan is made from --scores and targets: drop --heads with "
                         "--plan or --budget")
    check_output_dir(args.out, force=args.force, inputs=[args.model, args.checkpoint, args.scores, args.plan])
    model = load_model(args.model, args.checkpoint)
    random_weights_warning(args.model, args.checkpoint)
    proxy = _proxy_inputs(args, model) if args.data else None  # read before anything is written
    if args.plan is not None:
        plan = Plan.load(args.plan)
    else:
        scores = Scores.load(args.scores)
        note = check_scores_fingerprint(scores, model, args.scores, model_spec=args.model,
                                        checkpoint=args.checkpoint)  # refuses scores of another model
        if note:
            warn(note)
        if args.budget is not None:
            plan = _budget_plan(args, model, scores, proxy)
        else:
            head_scores = None
            if args.heads == "whole" and proxy is not None:
                from .importance.heads import head_scores as exact_head_scores

                head_scores = exact_head_scores(model, proxy, progress=True)
            elif args.heads == "whole":
                warn("--heads whole without --data ranks heads by the sum of their dims' scores; add --data for "
                     "the exact divergence of removing each head")
            plan = make_plan(model, scores, ratio=args.ratio, keep_heads=args.keep_heads, head_bias=args.head_bias,
                             heads=args.heads, head_scores=head_scores, **targets)
    pruned = prune(model, plan, compensate=args.compensate, proxy=proxy)
    if args.compensate != "none":
        print(pruned.upvit_config.extra["compensation"]["summary"])
    p0, p1 = count_params(model), count_params(pruned)
    m0, m1 = count_macs(model), count_macs(pruned)
    pruned.upvit_config.extra.update(_run_record(args, _prune_inputs(args, model,
                                                                     scores if args.plan is None else None),
                                                 results={"params": p1, "params_before": p0, "macs": m1,
                                                          "macs_before": m0}))
    save(pruned, args.out)
    plan.save(os.path.join(args.out, "plan.json"))
    print(f"params {p0:,} -> {p1:,} ({p1 / p0:.1%})")
    print(f"MACs   {m0:,} -> {m1:,} ({m1 / m0:.1%})")
    eq = pruned.upvit_config.timm_equivalent
    print(f"wrote {args.out} ({plan.summary()})" + (f"; same architecture as timm {eq}" if eq else ""))
    _certify(args, pruned, source=model, proxy=proxy)
    return 0


def _budget_plan(args: argparse.Namespace, model, scores, proxy):
    """--budget: the candidate shapes within the budget, each plan's joint divergence on the proxy set, the lowest."""
    from .adapters import get_adapter
    from .budget import choose, format_candidates
    from .importance.kl import criterion_name

    flush_warnings()
    cands = choose(model, scores, proxy, args.budget, grid=args.budget_grid, latency_batch=args.budget_batch,
                   runtime=args.budget_runtime)
    criterion = f"joint {criterion_name(get_adapter(model).divergence)}"
    print(f"{len(cands)} candidate shapes within {args.budget.kind}={args.budget.fraction:g} "
          f"(proxy: {args.proxy_size} samples of {args.data}), lowest {criterion} first:")
    print(format_candidates(cands, args.budget, criterion))
    plan = cands[0].plan
    plan.meta["budget"] = {"kind": args.budget.kind, "fraction": args.budget.fraction, "use": cands[0].use,
                           "joint_divergence": cands[0].divergence, "grid": args.budget_grid,
                           "candidates": [{"shape": c.shape(), "use": c.use, "joint_divergence": c.divergence}
                                          for c in cands]}
    return plan


def _budget_arg(text: str):
    from .budget import Budget

    try:
        return Budget.parse(text)
    except UpvitError as e:
        raise argparse.ArgumentTypeError(str(e).replace(f"--budget {text!r}: ", "")) from None


def _certify(args: argparse.Namespace, model, source, proxy) -> None:
    """The output's certificate (upvit.certificate): a failed reload through the stock class is an error."""
    from .certificate import certify

    report = certify(args.out, model, source=source, proxy=proxy, onnx=args.onnx,
                     extra={"command": _command(args)})
    r = report["reload"]
    line = f"reload through {r['loader']} in a fresh process: passed (max |diff| {r['max_abs_diff']:.2g})"
    if report.get("proxy_divergence"):
        d = report["proxy_divergence"]
        line += f"; proxy {d['criterion']} {d['sum']:.4g} over {d['samples']} samples"
    if report.get("onnx"):
        line += f"; model.onnx parity {report['onnx']['max_abs_diff']:.2g}"
    print(line + f"; wrote report.json and report.md ({report['seconds']:.1f}s)")


def _proxy_inputs(args: argparse.Namespace, model):
    """The proxy set of ``--data`` (``--proxy-size`` samples, seed ``--proxy-seed``) as model inputs."""
    from .adapters import get_adapter
    from .data import load_data, sample_proxy
    from .importance.api import proxy_tensor

    text = _text_kwargs(model)
    dataset, _ = load_data(args.data, data_config=model.upvit_config.data_config or None, **(
        {"tokenizer": text["tokenizer"]} if text else {}))
    subset, _ = sample_proxy(dataset, size=args.proxy_size, seed=args.proxy_seed)
    return proxy_tensor(subset, get_adapter(model).input_size())


def _int_or_list(text: str) -> int | list[int]:
    """``12`` -> 12; ``16,32,64`` -> [16, 32, 64] (one value per stage)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or comma-separated ones, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"widths and head counts must be positive, got {text!r}")
    return values[0] if len(values) == 1 else values


def _prune_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scores", help="scores file from `upvit score` (.safetensors)")
    src.add_argument("--plan", help="plan.json to replay (from an earlier prune, or written by hand)")
    p.add_argument("--embed-dim", type=_int_or_list, help="residual width to keep (N, or N1,N2,... one per stage)")
    p.add_argument("--num-heads", type=_int_or_list, help="heads to keep per block (must divide the model's heads; "
                   "one value, or one per stage)")
    p.add_argument("--mlp-hidden", type=_int_or_list,
                   help="FFN hidden units to keep per block (one value, or one per stage)")
    p.add_argument("--attn-dim", type=_int_or_list,
                   help="attention width (default: the embed dim; timm ViT requires that)")
    p.add_argument("--ratio", type=fraction, help="keep this fraction of embed dims, heads and FFN units")
    p.add_argument("--keep-heads", action="store_true", help="with --ratio: keep the head count, shrink the head dim")
    p.add_argument("--head-bias", default="mean", choices=["mean", "best"],
                   help="Swin: a merged head's relative-position bias is the mean of its heads' or the best head's")
    p.add_argument("--heads", default="merge", choices=["merge", "whole"],
                   help="merge: each new head takes the best dims of consecutive original heads (the paper); "
                   "whole: keep the best whole original heads, ranked by the exact divergence of removing each on the "
                   "--data proxy set (without --data: by the sum of their dims' scores)")
    p.add_argument("--compensate", default="none", choices=["none", "bias", "lsq"],
                   help="after pruning, refit the layers that read pruned channels on the --data proxy set so they "
                   "reproduce the original's outputs: lsq = weights and bias by ridge least squares, bias = bias only "
                   "(default none, the paper's; see README 'Compensation')")
    p.add_argument("--data",
                   help="proxy data (animal-mnist:train, an ImageFolder, shakespeare:train ...): the report's "
                   "divergence of the pruned model from the original is measured on --proxy-size samples of it; "
                   "--heads whole and --compensate use the same samples (give the options `upvit score` had)")
    p.add_argument("--proxy-size", type=positive_int, default=256, help="proxy samples drawn from --data (seeded)")
    p.add_argument("--proxy-seed", type=nonneg_int, default=0, help="seed of the proxy sampling")
    p.add_argument("--budget", type=_budget_arg,
                   help="instead of a shape: macs=F, params=F or latency=F (a fraction of "
                   "the original's); the shapes within it are compared by their joint divergence on the --data proxy "
                   "set and the lowest is kept")
    p.add_argument("--budget-grid", type=positive_int, default=8,
                   help="--budget: widths are searched at fractions k/GRID of the original's")
    p.add_argument("--budget-batch", type=positive_int, default=64, help="--budget latency=: the batch size timed")
    p.add_argument("--budget-runtime", default="torch", choices=["torch", "onnxruntime"],
                   help="--budget latency=: the runtime timed (see upvit bench --runtime)")
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx, checked for ONNX Runtime parity (report)")
    p.add_argument("--out", required=True, help="output model directory (config.json, model.safetensors, plan.json, "
                   "report.json, report.md)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")


# ------------------------------------------------------------------------------------------ score
@command("score")
def cmd_score(args: argparse.Namespace) -> int:
    import time

    import torch

    from . import distributed as dist_utils
    from .adapters import get_adapter
    from .adapters.base import batch_len
    from .data import check_data_spec, load_data, sample_proxy, stack_images
    from .importance.api import DATA_FREE, LABELLED, PERSISTING, get_method, proxy_labels, proxy_tensor, score
    from .importance.kl import samples_word
    from .models import load_model

    t0 = time.time()
    # everything the arguments alone decide is checked before anything is loaded or written
    get_method(args.method)
    targets = _parse_targets(args.target)
    if args.method in ("hybrid", "greedy") and targets is None and args.ratios is None:
        raise UpvitError(f"--method {args.method} needs the target shapes: --target EMBED,HEADS,MLP (repeatable) "
                         "or --ratios 0.5 0.25")
    if args.method not in ("hybrid", "greedy") and (targets is not None or args.ratios is not None):
        raise UpvitError("--target and --ratios apply to --method hybrid and greedy only")
    if (args.dtype or args.memory_gb) and args.method != "kl":
        raise UpvitError(f"--dtype and --memory-gb apply to --method kl only (got --method {args.method}): drop them")
    if args.dtype == "fp16" and not ((args.device or "").startswith("cuda") or
                                     (args.device is None and torch.cuda.is_available())):
        raise UpvitError("--dtype fp16 needs a CUDA device: use --dtype bf16 on the CPU (or --device cuda)")
    if args.resume and args.method not in PERSISTING:
        raise UpvitError(f"--method {args.method} cannot resume (it keeps no partial state): drop --resume, "
                         f"and add --force to overwrite {args.out}")
    check_device(args.device)
    check_output_file(args.out, force=args.force, resume=args.resume, inputs=[args.model, args.checkpoint, args.data])
    dist_utils.init_if_needed()  # under torchrun; main() leaves the group after the command
    model = load_model(args.model, args.checkpoint)
    random_weights_warning(args.model, args.checkpoint)
    adapter = get_adapter(model)
    if args.method in DATA_FREE:  # magnitude, random: nothing of the data is read (but a bad spec is refused)
        check_data_spec(args.data)
        images, subset, record = None, None, {"data": None, "note": f"--method {args.method} uses no data"}
    elif _text_kwargs(model):
        if args.per_class:
            raise UpvitError("--per-class needs classes, and text data has none: use --proxy-size N")
        dataset, _ = load_data(args.data, data_config=model.upvit_config.data_config or None,
                               tokenizer=getattr(model, "upvit_tokenizer", None))
        subset, record = sample_proxy(dataset, size=args.proxy_size, seed=args.seed)
        images = proxy_tensor(subset, adapter.input_size())  # a dict of token tensors
    else:
        dataset, _ = load_data(args.data, data_config=model.upvit_config.data_config or None,
                               skip_bad_images=args.skip_bad_images)
        subset, record = sample_proxy(dataset, size=None if args.per_class else args.proxy_size,
                                      per_class=args.per_class, seed=args.seed)
        images = proxy_tensor(stack_images(subset), adapter.input_size())  # unreadable files: error or dropped
        if len(images) < len(subset):
            record.update(num_images=len(images), unreadable_skipped=len(subset) - len(images))
            warn(f"skipped {len(subset) - len(images)} unreadable image file(s) of the proxy set: it has {len(images)}")
    if images is not None:
        record["data"] = args.data
    device = torch.device(args.device) if args.device else dist_utils.default_device()
    meta = {"model_spec": args.model, "checkpoint": args.checkpoint, "seed": args.seed, "command": _command(args),
            "inputs": {"model": args.model, "checkpoint": _file_input(args.checkpoint), "data": args.data}}
    model.to(device)
    options = {"batch_size": args.batch_size}
    if args.method == "kl" and (args.dtype or args.memory_gb):
        options.update(dtype=args.dtype, memory_gb=args.memory_gb)
    if args.dtype == "bf16" and device.type == "cpu":
        from .importance.kl import cpu_bf16_native

        if not cpu_bf16_native():
            warn("--dtype bf16: this CPU has no native bf16 (AVX-512 BF16 or AMX), so bf16 matrix products are "
                 "emulated and far slower than fp32: drop --dtype (fp32) here")
    if args.method in ("hybrid", "greedy"):
        options.update({"targets": targets, "ratios": args.ratios})
    if args.method in LABELLED:  # e.g. taylor: the cross-entropy needs the proxy images' labels
        labels = proxy_labels(subset)
        if labels is None or len(labels) != batch_len(images):
            raise UpvitError(f"--method {args.method} needs a label for every proxy sample: use labelled image "
                             "data whose proxy images are all readable")
        options["labels"] = labels
    flush_warnings()
    scores = score(model, images, method=args.method, out=args.out, resume=args.resume, proxy_meta=record,
                   meta=meta, **options)
    if dist_utils.is_main():
        criterion = scores.meta.get("criterion", args.method)  # e.g. a sentence encoder's exact score is 1 - cos
        what = f"exact {criterion}" if args.method == "kl" else args.method if criterion in (args.method, "kl") \
            else f"{args.method} ({criterion})"
        used = "no data used" if images is None else f"on {batch_len(images)} proxy {samples_word(images)}"
        print(f"wrote {args.out}: {what} scores of {sum(t.numel() for _, t in scores.items())} channels ({used}) "
              f"in {time.time() - t0:.1f}s")
    return 0


def _parse_targets(values: list[str] | None) -> list[dict[str, object]] | None:
    """``["96,6,384", ...]`` -> ``[{"embed_dim": 96, "num_heads": 6, "mlp_hidden": 384}, ...]``; a field may
    give one value per stage separated by ``/`` (``16/32/64/128,1/2/4/8,64/128/256/512``)."""
    from .targets import parse_target_text

    return [parse_target_text(v) for v in values] if values else None


def _score_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--data", required=True, help="where the proxy set is drawn from: animal-mnist:train, an "
                   "ImageFolder directory, shakespeare:train or text:FILE_OR_DIR (text models)")
    p.add_argument("--proxy-size", type=positive_int, default=2000,
                   help="random proxy images (seeded); 2,000 is the paper's: exact KL's time grows linearly with it "
                        "(days on a CPU at 224 px; the run prints its estimate first, README lists measured costs)")
    p.add_argument("--per-class", type=positive_int, default=None, help="instead: this many images of every class")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the proxy sampling")
    p.add_argument("--method", default="kl", help="kl (exact, the paper's: one partial forward per channel per proxy "
                   "image), fisher (an estimate from a few backward passes per image: seconds), "
                   "hybrid (exact keep sets "
                   "at --target for a fraction of kl's time), magnitude, random (no data), taylor, greedy")
    p.add_argument("--target", action="append",
                   help="hybrid: a shape EMBED,HEADS,MLP whose keep sets must equal exact's; "
                   "greedy: a shape whose residual width the greedy path passes (repeatable; per-stage values "
                   "separated by '/')")
    p.add_argument("--ratios", type=fraction, nargs="+", help="hybrid/greedy: instead of --target, keep ratios such as "
                   "0.5 0.25")
    p.add_argument("--batch-size", type=positive_int, default=64, help="proxy images per forward")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="--method kl: precision of the candidates' forwards (the teacher's reference stays fp32, the "
                        "KL float64); bf16 about 2x faster on CPUs with AVX-512 BF16, fp16 on CUDA only; default fp32 "
                        "(benchmarks/results/scale.md: score error and keep sets)")
    p.add_argument("--memory-gb", type=positive_float, default=None,
                   help="--method kl: activation memory (GiB) the stacked candidate forwards may use (default 6: safe "
                        "on a 16 GB machine)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", required=True, help="scores file (.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run writing --out (--method kl)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    _add_data_args(p, class_map=False)  # labels are not used by scoring, so the classes need not match


# ------------------------------------------------------------------------------------------ depth
@command("depth")
def cmd_depth(args: argparse.Namespace) -> int:
    from .data import load_data, sample_proxy, stack_images
    from .depth import DepthConfig, run_depth
    from .importance.api import proxy_tensor
    from .models import load_model
    from .train import TrainConfig

    cfg = None
    if args.epochs:
        lr = args.lr if args.lr is not None else 1e-3 * args.batch_size / 256
        warmup = args.warmup_epochs if args.warmup_epochs is not None else min(2.0, 0.1 * args.epochs / args.steps)
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr, min_lr=args.min_lr,
                          weight_decay=args.weight_decay, warmup_epochs=warmup, ema_decay=args.ema_decay,
                          seed=args.seed, num_workers=args.workers, amp=args.amp,
                          max_steps_per_epoch=args.max_steps_per_epoch)
    # the run's settings are checked before any model or image is read
    depth_cfg = DepthConfig(remove=args.remove, steps=args.steps, criterion=args.criterion,
                            kinds=("block",) if args.blocks_only else ("block", "hybrid"),
                            candidate_blocks=args.candidate_blocks, train_config=cfg, alpha=args.alpha,
                            temperature=args.temperature, score_batch_size=args.score_batch_size,
                            bench_batch=args.bench_batch, bench_runs=args.bench_runs)
    check_output_dir(args.out, force=args.force, resume=args.resume,
                     inputs=[args.model, args.checkpoint, args.teacher, args.teacher_checkpoint, args.data,
                             args.val_data])
    model = load_model(args.model, args.checkpoint)
    random_weights_warning(args.model, args.checkpoint)
    teacher = load_model(args.teacher or args.model, args.teacher_checkpoint if args.teacher else args.checkpoint)
    if args.teacher:
        random_weights_warning(args.teacher, args.teacher_checkpoint, "--teacher-checkpoint")
    data_config = model.upvit_config.data_config or None
    train_ds, val_ds = _distillation_image_data(args, model, data_config)  # checked before the proxy reads any image
    # the proxy set: evaluation transform (its labels are not used by the scores)
    plain, _ = load_data(args.data, data_config=data_config, skip_bad_images=args.skip_bad_images)
    subset, record = sample_proxy(plain, size=None if args.per_class else args.proxy_size, per_class=args.per_class,
                                  seed=args.proxy_seed)
    proxy = proxy_tensor(stack_images(subset))  # unreadable files: error, or dropped with --skip-bad-images
    if len(proxy) < len(subset):
        record.update(num_images=len(proxy), unreadable_skipped=len(subset) - len(proxy))
        warn(f"skipped {len(subset) - len(proxy)} unreadable image file(s) of the proxy set: it has {len(proxy)}")
    if args.force and not args.resume:  # start over: the earlier run's record and checkpoints go
        _discard_depth_run(args.out)
    flush_warnings()
    final = _fit_or_explain(lambda: run_depth(
                        depth_cfg, model, teacher, train_ds, proxy, args.out, val_data=val_ds, resume=args.resume,
                        device=args.device,
                        meta={"command": _command(args), "proxy": {**record, "data": args.data},
                              "inputs": {"model": _model_input(args.model, model, args.checkpoint),
                                         "teacher": _model_input(args.teacher or args.model, teacher,
                                                                 args.teacher_checkpoint if args.teacher
                                                                 else args.checkpoint),
                                         "data": _data_input(args.data, train_ds),
                                         "val_data": _data_input(args.val_data, val_ds)},
                              "teacher": args.teacher or args.model}), args.out)
    _report_unreadable(train_ds, val_ds)
    with open(os.path.join(args.out, "depth.md")) as f:
        print(f.read().rstrip())
    from .adapters import get_adapter

    print(f"wrote {args.out}: {get_adapter(final).topology().num_blocks} blocks")
    return 0


def _discard_depth_run(out: str) -> None:
    """``depth --force`` without ``--resume``: remove the earlier depth run's own files (its record, log,
    report and step folders), which would otherwise make the run refuse to start; nothing else in --out."""
    import shutil

    from .depth import RUN_FILE

    if not os.path.isfile(os.path.join(out, RUN_FILE)):
        return
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name in (RUN_FILE, "log.jsonl", "depth.md") and os.path.isfile(path):
            os.unlink(path)
        elif name.startswith("step-") and os.path.isdir(path):
            shutil.rmtree(path)


def _depth_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--teacher", help="the model to distil from (default: MODEL itself, the original)")
    p.add_argument("--teacher-checkpoint", help="state dict to load into the teacher")
    p.add_argument("--data", required=True, help="training data (fine-tuning, and the proxy set is drawn from it)")
    p.add_argument("--val-data", help="validation data: accuracy before and after each step's fine-tuning")
    p.add_argument("--remove", type=positive_int, required=True,
                   help="blocks-worth to remove in all (2 units each: a block attn.i+ffn.i or a hybrid ffn.i+attn.i+1)")
    p.add_argument("--steps", type=positive_int, default=1,
                   help="rounds of score -> remove -> fine-tune (--remove splits evenly)")
    p.add_argument("--criterion", default="kl", choices=["kl", "block_influence", "last"],
                   help="kl: the paper's summed KL on the proxy set; block_influence: ShortGPT's 1 - cos(in, out); "
                        "last: the last blocks")
    p.add_argument("--blocks-only", action="store_true", help="whole blocks only, no hybrid blocks")
    p.add_argument("--candidate-blocks", type=positive_int, default=1,
                   help="blocks-worth per candidate (2: pairs, e.g. inside a shifted Swin stage)")
    p.add_argument("--proxy-size", type=positive_int, default=256, help="random proxy images (seeded) for the scores")
    p.add_argument("--per-class", type=positive_int, default=None,
                   help="instead: this many proxy images of every class")
    p.add_argument("--proxy-seed", type=nonneg_int, default=0, help="seed of the proxy sampling")
    p.add_argument("--epochs", type=nonneg_int, required=True,
                   help="fine-tuning epochs of the whole run, split evenly over the steps (0: no fine-tuning)")
    p.add_argument("--alpha", type=nonneg_float, default=1.0,
                   help="weight of the batch-mean KL(teacher || student) term")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="softmax temperature of the KL term (x T^2)")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="global batch size of the fine-tuning (split over torchrun ranks)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate of each step (default 1e-3 x batch / 256)")
    p.add_argument("--min-lr", type=nonneg_float, default=1e-5, help="learning rate at the end of each step's cosine")
    p.add_argument("--weight-decay", type=nonneg_float, default=WEIGHT_DECAY, help=WEIGHT_DECAY_HELP)
    p.add_argument("--warmup-epochs", type=nonneg_float, default=None,
                   help="linear warm-up of each step (default min(2, epochs per step / 10))")
    p.add_argument("--score-batch-size", type=positive_int, default=64, help="proxy images per forward when scoring")
    p.add_argument("--bench-batch", type=positive_int, default=64, help="batch size of the throughput measurement")
    p.add_argument("--bench-runs", type=positive_int, default=10, help="timed runs of the throughput measurement")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", required=True, help="run directory: steps, log.jsonl, depth.md and the final model")
    _add_run_args(p)


# ----------------------------------------------------------------------------------------- export
@command("export")
def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx
    from .models import load_model

    if not args.out.endswith(".onnx"):
        raise UpvitError(f"--out {args.out!r}: give a file name ending in .onnx, e.g. --out model.onnx")
    if os.path.exists(args.out) and not args.force:
        raise UpvitError(f"{args.out} already exists: choose another --out, or add --force to overwrite it")
    check_output_file(args.out, force=True, inputs=[args.model, args.checkpoint], partial_suffix=None)
    model = load_model(args.model, args.checkpoint)
    random_weights_warning(args.model, args.checkpoint)
    flush_warnings()
    result = export_onnx(model, args.out, exporter=args.exporter, opset=args.opset, check=not args.no_check,
                         rtol=args.rtol)
    axes = ", ".join(f"{name}[{','.join(f'{a}:{n}' for a, n in ax.items())}]"
                     for name, ax in result.dynamic_axes.items())
    print(f"exported with the {result.exporter} exporter, opset {result.opset}; dynamic axes {axes}")
    for p in result.parity:
        at = f"batch {p.batch_size}" + (f", sequence {p.seq_len}" if p.seq_len else "")
        print(f"parity in onnxruntime at {at}: max |diff| {p.max_abs_diff:.3g} (tolerance {p.tolerance:.3g})")
    print(f"wrote {args.out}")
    return 0


def _export_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--exporter", default="legacy", choices=["legacy", "dynamo"],
                   help="torch.onnx exporter: legacy (TorchScript, opset 17; fast) or dynamo (torch.export, opset 18)")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default 17 legacy, 18 dynamo)")
    p.add_argument("--rtol", type=positive_float, default=1e-3,
                   help="parity tolerance: max |onnxruntime - torch| <= RTOL x max(|torch output|, 1)")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime parity check")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")


# ------------------------------------------------------------------------------------------ demo
@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import ASSET_TEACHER, DemoConfig, run_demo
    from .importance.api import get_method

    get_method(DemoConfig.method if args.method is None else args.method)  # fails before anything is written
    teacher = args.teacher or ASSET_TEACHER
    if not os.path.isdir(teacher):
        raise UpvitError(f"teacher {teacher!r} not found: pass a model directory to --teacher, or run `make teacher`")
    check_output_dir(args.out or DemoConfig.out, force=args.force, inputs=[teacher])
    overrides = {k: v for k, v in {"out": args.out, "teacher": args.teacher, "epochs": args.epochs,
                                   "proxy_size": args.proxy_size, "method": args.method,
                                   "compensate": args.compensate}.items() if v is not None}
    cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    run_demo(cfg)
    return 0


def _demo_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="a tiny version (seconds to minutes) for tests and smoke checks")
    p.add_argument("--out", default=None, help="output directory (default demo_out)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (earlier results are replaced)")
    p.add_argument("--teacher", default=None, help="teacher model directory (default: the shipped teacher)")
    p.add_argument("--epochs", type=positive_int, default=None, help="fine-tuning epochs for every student (default 4)")
    p.add_argument("--proxy-size", type=positive_int, default=None, help="proxy images for scoring (default 32)")
    p.add_argument("--method", default=None, help="scoring method for the UP-ViT students (default hybrid)")
    p.add_argument("--compensate", default=None, choices=["none", "bias", "lsq"],
                   help="fine-tune every pruned student after this compensation (default none, the paper's); the "
                   "report shows the top-1 before fine-tuning without and with lsq either way")


PARSERS = {"train": (_train_parser, ("train a model (timm or Hugging Face; images or text): from scratch for a "
                                     "timm:/hf: spec, further for a model directory")),
           "finetune": (_finetune_parser, "fine-tune a pruned model with distillation from the original"),
           "eval": (_eval_parser, ("evaluate a model on a dataset: top-1 accuracy and loss (classifiers), perplexity "
                                   "(language models), similarity agreement with --teacher (sentence encoders) or "
                                   "kNN top-1 of its features with --knn-train (image backbones, headless ones "
                                   "included)")),
           "bench": (_bench_parser, "parameters, MACs and throughput of models"),
           "score": (_score_parser, "importance of every channel (exact KL by default) on a seeded proxy set"),
           "prune": (_prune_parser, "prune a model to a smaller one of the same family from scores or a plan"),
           "export": (_export_parser, "export a model to ONNX, checked against PyTorch in ONNX Runtime"),
           "depth": (_depth_parser, "remove blocks (and hybrid blocks) progressively, fine-tuning after each step"),
           "demo": (_demo_parser, "the whole method on the embedded default, with baselines")}


def _version() -> str:
    from . import __version__

    return __version__


def _default_device():
    from .distributed import default_device

    return default_device()


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="upvit", description="Unified structured pruning of vision transformers (UP-ViTs).",
                           formatter_class=DefaultsFormatter)
    parser.add_argument("--version", action="version", version=f"upvit {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, help_text) in PARSERS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure is one line on stderr and a non-zero status."""
    start_command()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0), or an argument error already printed as one line (2)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what the outputs record as their command
    # what this command will create: removed again if it fails and leaves nothing to --resume from
    outputs = [getattr(args, "out", None), getattr(args, "json", None)]
    created = new_paths(outputs) if int(os.environ.get("RANK", "0")) == 0 else []
    try:
        if args.command in ("train", "finetune", "depth"):  # readable epoch lines, or the log's JSON records
            from . import train

            train.JSON_LINES = args.json_lines
        code = COMMANDS[args.command](args)
        if code == 0 and "torch.distributed" in sys.modules:  # every rank leaves together (torchrun)
            from . import distributed

            distributed.shutdown()
        flush_warnings()
        return code
    except UpvitError as e:
        drop_warnings()  # an error case prints only the error
        remove_unfinished(created)
        print(f"upvit: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        drop_warnings()
        remove_unfinished(created)
        print("upvit: interrupted; long jobs continue from their last checkpoint with --resume", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or os.environ.get("UPVIT_DEBUG"):
            return _unexpected(e, created)
        drop_warnings()
        removed = remove_unfinished(created)
        path = e.filename or next((p for p in outputs if p), "the output")  # a failed write() names no file
        left = f"; removed the unfinished {', '.join(removed)}" if removed else ""
        print(f"upvit: error: {e.strerror or 'no space left on device'} while writing {path}: free space on that "
              f"disk or choose another --out{left}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug or an unforeseen failure: still one line; UPVIT_DEBUG=1 shows the traceback
        return _unexpected(e, created)


def _unexpected(e: Exception, created: list[str]) -> int:
    """A bug or an unforeseen failure: still one line; UPVIT_DEBUG=1 shows the traceback."""
    if os.environ.get("UPVIT_DEBUG"):
        raise e
    drop_warnings()
    remove_unfinished(created)
    print(f"upvit: error: unexpected {type(e).__name__}: {one_line(str(e))[:300]} "
          "(rerun with UPVIT_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
