"""`upvit train`, `finetune` and `depth` print one readable line per epoch on the terminal (epoch k/N,
losses, validation top-1, the learning rate in short form, elapsed time and ETA) and keep the JSON
records in log.jsonl; ``--json`` prints those records instead."""
from __future__ import annotations

import json
import re

from helpers import write_image_folder
from upvit.cli import build_parser, main

SPEC = "timm:vit_base_patch16_224,img_size=16,patch_size=4,num_classes=2,embed_dim=16,depth=1,num_heads=2"
LINE = re.compile(r"^epoch (\d+)/(\d+)  loss (\d+\.\d{4})  val top-1 (\d+\.\d\d)% \(loss (\d+\.\d{4})\)  "
                  r"lr (\d\.\d\de[-+]\d\d)  \d+\.\d s/epoch  elapsed \d+ s(, ETA \d+ s|, done)$")


def train(tmp_path, *extra):
    data = tmp_path / "data"
    write_image_folder(data, per_class=4, size=16)
    out = tmp_path / "run"
    code = main(["train", SPEC, "--data", str(data), "--val-data", str(data), "--epochs", "2", "--batch-size", "4",
                 "--max-steps-per-epoch", "2", "--warmup-epochs", "1", "--out", str(out), *extra])
    assert code == 0
    with open(out / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def test_train_prints_a_readable_line_per_epoch_and_keeps_json_in_the_log(tmp_path, capsys):
    records = train(tmp_path)
    stdout = capsys.readouterr().out.splitlines()
    epochs = [line for line in stdout if line.startswith("epoch ")]
    assert not [line for line in stdout if line.startswith("{")], stdout  # no raw JSON on the terminal
    assert len(epochs) == 2 == len(records), stdout
    for line, record in zip(epochs, records):
        m = LINE.match(line)
        assert m, line
        # the line says what the log says, rounded for reading
        assert (int(m[1]), int(m[2])) == (record["epoch"], 2)
        assert abs(float(m[3]) - record["train_loss"]) <= 0.51e-4
        assert abs(float(m[4]) - record["val_top1"]) <= 0.51e-2 and abs(float(m[5]) - record["val_loss"]) <= 0.51e-4
        assert m[6] == f"{record['lr']:.2e}"
    assert epochs[0].endswith("s") and ", ETA " in epochs[0] and epochs[1].endswith(", done")


def test_json_prints_the_log_records(tmp_path, capsys):
    records = train(tmp_path, "--json")
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == records


def test_finetune_and_depth_take_json_too():
    parser = build_parser()
    for command in (["finetune", "m", "--teacher", "t"], ["depth", "m", "--remove", "1", "--epochs", "1"]):
        args = parser.parse_args([*command, "--data", "d", "--out", "o", "--json"])
        assert args.json_lines is True
