"""A family is one file: its record (``FAMILY``) and its registry row are all the loaders know of it,
ModelConfig reads and writes the historic files, and the adapters import nothing of the layers above."""
from __future__ import annotations

import ast
import importlib
import json
import pathlib

import pytest

import upvit
from upvit import adapters
from upvit.adapters.family import Family
from upvit.config import ModelConfig
from upvit.hf import default_classes, supported_classes
from upvit.models import LIBRARIES, load_model
from upvit.tasks import TEXT_TASKS, Task

PACKAGE = pathlib.Path(upvit.__file__).parent


def test_every_builtin_row_has_its_record():
    names = {lib.name for lib in LIBRARIES}
    for name, module, _, _ in adapters.BUILTIN:
        record = importlib.import_module(module).FAMILY
        assert isinstance(record, Family) and record.name == name and record.library in names
        assert all(task in set(Task) for task in record.classes.values())
        assert set(record.model_types.values()) <= set(record.classes)


def test_hf_tables_are_the_records_union():
    # the tables hf.py held before the records (written out by hand): the records must restate nothing less
    assert supported_classes() == {
        "GPT2LMHeadModel": "causal-lm", "BertForMaskedLM": "masked-lm", "BertModel": "sentence-embedding",
        "ViTForImageClassification": "image-classification", "DeiTForImageClassification": "image-classification",
        "DeiTForImageClassificationWithTeacher": "image-classification"}
    assert default_classes() == {"gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM",
                                 "vit": "ViTForImageClassification", "deit": "DeiTForImageClassification"}
    assert TEXT_TASKS == {"causal-lm", "masked-lm", "sentence-embedding"} and "image-classification" not in TEXT_TASKS


def _bare_gpt2_data_config(model):
    return {"task": str(Task.SENTENCE_EMBEDDING), "max_length": int(model.config.n_positions)}


def test_a_registered_record_is_all_a_new_hf_family_needs(monkeypatch, tmp_path):
    """A third family of GPT-2 bodies (the bare GPT2Model as a sentence encoder), declared by its record
    alone: hf: specs build it, its data config and task come from the record, and it saves and reloads."""
    monkeypatch.setattr(adapters, "_REGISTERED", list(adapters._REGISTERED))
    monkeypatch.setattr(adapters, "_RECORDS", dict(adapters._RECORDS))
    spec = "hf:gpt2-bare,n_layer=1,n_embd=8,n_head=2,vocab_size=20,n_positions=8"
    with pytest.raises(upvit.UpvitError, match="not a supported class or model type"):
        load_model(spec)
    record = Family("test_gpt2_bare", "hf", classes={"GPT2Model": Task.SENTENCE_EMBEDDING},
                    model_types={"gpt2-bare": "GPT2Model"}, data_config=_bare_gpt2_data_config)
    adapters.register("test_gpt2_bare", lambda model: False, lambda model: None, family=record)
    model = load_model(spec)
    assert type(model).__name__ == "GPT2Model" and model.config.n_embd == 8
    assert model.upvit_config.family == "hf" and model.upvit_config.name == "GPT2Model"
    assert model.upvit_config.data_config == {"task": "sentence-embedding", "max_length": 8}
    assert adapters.task_of(model) == Task.SENTENCE_EMBEDDING
    del model.upvit_config  # a model built outside upvit: task from the record of its class
    assert adapters.task_of(model) == Task.SENTENCE_EMBEDDING
    again = load_model("hf:GPT2Model,n_layer=1,n_embd=8,n_head=2,vocab_size=20,n_positions=8")
    upvit.save(again, str(tmp_path / "m"))
    loaded = upvit.load(str(tmp_path / "m"))
    assert type(loaded).__name__ == "GPT2Model" and loaded.upvit_config.data_config["task"] == "sentence-embedding"
    for key, value in again.state_dict().items():
        assert loaded.state_dict()[key].equal(value), key


def test_model_config_reads_and_writes_the_historic_keys():
    old = {"format": "upvit-model", "version": 1, "timm_name": "vit_tiny_patch16_224", "timm_kwargs": {"depth": 2},
           "family": "timm", "data_config": {}, "class_names": None, "timm_equivalent": None, "extra": {}}
    config = ModelConfig.from_dict(old)
    assert (config.name, config.kwargs) == ("vit_tiny_patch16_224", {"depth": 2})
    assert (config.timm_name, config.timm_kwargs) == (config.name, config.kwargs)
    assert config.to_dict() == old and list(config.to_dict()) == list(old)  # the same file, key order included
    generic = ModelConfig.from_dict({"format": "upvit-model", "version": 1, "name": "x", "kwargs": {"a": 1}})
    assert generic == ModelConfig(timm_name="x", timm_kwargs={"a": 1}) == ModelConfig("x", {"a": 1})
    config.timm_kwargs = {"depth": 3}
    assert config.kwargs == {"depth": 3}


def test_shipped_model_configs_load_unchanged():
    for sub in ("teacher", "swin_teacher", "pvt_teacher"):
        path = PACKAGE / "assets" / sub / "config.json"
        if path.is_file():
            raw = json.loads(path.read_text())
            assert ModelConfig.from_dict(raw).to_dict() == raw
    sidecar = PACKAGE / "assets" / "lm_teacher" / "upvit.json"
    if sidecar.is_file():
        raw = json.loads(sidecar.read_text())
        assert ModelConfig.from_dict(raw).to_dict() == raw


# the layers above the adapters: loading, planning, scoring, data, training and the CLI
ABOVE = ("models", "io", "hf", "plan", "surgery", "importance", "data", "text", "evaluation", "train", "distill",
         "cli", "bench", "export", "certificate", "depth", "iterative", "budget", "probe", "demo")
# the DINOv2 converter is a command (python -m upvit.adapters.dinov2_onnx) that writes a model directory
CONVERTERS = {"dinov2_onnx.py"}


def _upvit_modules(node: ast.AST) -> list[str]:
    """The upvit modules an import statement of an adapter module names (relative to the package)."""
    if isinstance(node, ast.ImportFrom):
        if node.level == 2:  # from ..X import y / from .. import X
            return [node.module] if node.module else [a.name for a in node.names]
        if node.level == 0 and (node.module or "").startswith("upvit."):
            return [node.module[len("upvit."):]]
    elif isinstance(node, ast.Import):
        return [a.name[len("upvit."):] for a in node.names if a.name.startswith("upvit.")]
    return []


def test_adapters_import_nothing_above_them():
    """No circle between loading, planning and adapters: every adapter module, lazy and type-checking
    imports included, imports only the layers below (errors, config, files, tasks, topology, _compat)
    and its siblings."""
    for path in sorted((PACKAGE / "adapters").glob("*.py")):
        if path.name in CONVERTERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            bad = [m for m in _upvit_modules(node) if m.split(".")[0] in ABOVE]
            assert not bad, f"adapters/{path.name} line {node.lineno} imports upvit.{bad[0]}"
