"""``glmkit finetune`` and ``glmkit evaluate``: the config (errors name the field), data files of every format (bad
rows named by line or row, rejected or skipped), full / LoRA / prefix / classification runs end to end through the
CLI functions and once through ``python -m glmkit``, and the folders they write reloading to the same results."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from glmkit import GLM, GLMConfig
from glmkit.cli import main
from glmkit.config import ConfigError
from glmkit.finetune.cli import load_config
from glmkit.finetune.data import DataError
from glmkit.finetune.evaluate import load_for_evaluation
from glmkit.finetune.registry import build_task
from glmkit.finetune.sources import read_rows
from glmkit.tokenizer import WhitespaceTokenizer

NOUNS = "lamp door gate tap fire light oven radio engine fan stove bell".split()
WORDS = [*NOUNS, *"the is on off . is it ? answer: yes no way".split()]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer GLM with a whitespace tokenizer, saved as a checkpoint folder."""
    folder = tmp_path_factory.mktemp("tiny")
    tok = WhitespaceTokenizer(WORDS)
    torch.manual_seed(0)
    config = GLMConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=64, max_sequence_length=48)
    GLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _rows(nouns):
    return [{"text": f"the {n} is {s} .", "label": s} for n in nouns for s in ("on", "off")]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TASK = {"name": "cloze", "pattern": "{text} is it on ? answer:[MASK] .", "verbalizer": {"on": " yes", "off": " no"}}


def _config(tmp_path, model, **sections):
    base = {
        "model": str(model),
        "task": TASK,
        "data": {"train": str(_jsonl(tmp_path / "train.jsonl", _rows(NOUNS[:8]))),
                 "validation": str(_jsonl(tmp_path / "val.jsonl", _rows(NOUNS[8:])))},
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 6, "micro_batch_size": 8, "lr": 3e-3,
                  "eval_every": 3, "save_every": 3, "precision": "fp32", "progress": False,
                  "best_metric": "accuracy", "decay_style": "cosine", "warmup": 0.1},
    }  # fmt: skip
    for k, v in sections.items():  # a task with a name replaces the cloze task, other sections are merged
        merge = isinstance(v, dict) and not (k == "task" and "name" in v)
        base[k] = {**base.get(k, {}), **v} if merge else v
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


# ---- the config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train": {"lr": -1.0}}, r"train\.lr/grad_clip/weight_decay: must be positive"),
        ({"train": {"learning_rate": 1.0}}, r"train\.learning_rate: unknown key"),
        ({"train": {"epochs": "two"}}, r"train\.epochs: expected a positive number"),
        ({"method": {"name": "adapter"}}, r"method\.name: expected full, lora or prefix"),
        ({"method": {"name": "prefix", "merge": True}}, r"method\.merge: only LoRA adapters merge"),
        ({"data": {"on_bad_row": "ignore"}}, r"data\.on_bad_row: expected error or skip"),
        ({"task": {"name": "summarize"}}, r"task\.name: unknown task 'summarize'"),
        ({"task": {"pattern": "{text} no blank"}}, r"task\.pattern: .* must hold the blank \[MASK\] exactly once"),
        ({"task": {"verbalizer": ["yes", "no"]}}, r"task\.verbalizer: expected a mapping"),
        ({"task": {"max_length": "long"}}, r"task\.max_length: expected int, got 'long'"),
        ({"task": {"patern": "x"}}, r"task\.patern: unknown option of task cloze"),
        ({"colour": "blue"}, r"colour: unknown section"),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(tmp_path, tiny, change, message):
    path = _config(tmp_path, tiny, **change)
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(path)
        build_task(cfg.task["name"], {k: v for k, v in cfg.task.items() if k != "name"})


def test_the_cli_reports_a_config_error_in_one_line_naming_the_field(tmp_path, tiny, capsys):
    path = _config(tmp_path, tiny, task={"max_length": "long"})
    assert main(["finetune", "--config", str(path)]) == 2
    assert "glmkit finetune: error: task.max_length: expected int, got 'long'" in capsys.readouterr().err


def test_flags_override_the_config_and_a_step_count_replaces_its_epochs(tmp_path, tiny):
    path = _config(tmp_path, tiny, train={"epochs": 3})
    cfg = load_config(path, {"train": {"max_steps": 2, "lr": 0.5}, "method": {"name": "lora"}})
    assert cfg.epochs is None and cfg.train.max_steps == 2 and cfg.train.lr == 0.5 and cfg.method.name == "lora"
    assert load_config(path).epochs == 3


# ---- data ------------------------------------------------------------------------------------------------------


def test_every_format_gives_the_same_rows(tmp_path):
    rows = [{"text": "a b", "label": "on"}, {"text": "c d", "label": "off"}]
    jsonl = _jsonl(tmp_path / "d.jsonl", rows)
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": ds, "validation": ds.select([1])}).save_to_disk(str(tmp_path / "hub"))
    for spec in (jsonl, tmp_path / "d.csv", tmp_path / "d.parquet", f"hf:{tmp_path / 'hub'}:train"):
        assert [r.data for r in read_rows(spec)] == rows
    assert [r.data for r in read_rows(f"hf:{tmp_path / 'hub'}:validation")] == rows[1:]
    assert read_rows(tmp_path / "d.parquet")[1].where == f"{tmp_path / 'd.parquet'} row 2"
    with pytest.raises(ValueError, match=r"name a split as hf:NAME:SPLIT; the dataset has \['train', 'validation'\]"):
        read_rows(f"hf:{tmp_path / 'hub'}")
    with pytest.raises(ValueError, match=r"unknown data format '\.xml'"):
        (tmp_path / "d.xml").write_text("<x/>")
        read_rows(tmp_path / "d.xml")


def test_a_bad_row_is_named_by_line_or_row_and_rejected_or_skipped(tmp_path):
    task = build_task("cloze", {k: v for k, v in TASK.items() if k != "name"})
    tok = WhitespaceTokenizer(WORDS)
    good = {"text": "the lamp is on .", "label": "on"}
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"text": "x", "label": "dim"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl line 2: not valid JSON"):
        read_rows(jsonl)
    with pytest.warns(UserWarning, match=r"line 2: not valid JSON"):
        rows = read_rows(jsonl, "skip")
    with pytest.raises(DataError, match=r"d\.jsonl line 3: label 'dim' is not in the verbalizer"):
        task.prepare(tok, rows, train=True)
    with pytest.warns(UserWarning, match=r"line 3: label 'dim'"):
        assert len(task.prepare(tok, rows, train=True, on_error="skip")) == 1

    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nthe lamp is on .,on\nthe door,is,off\n,off\n")
    with pytest.raises(DataError, match=r"d\.csv: .*Expected 2 fields in line 3, saw 3"):
        read_rows(csv)
    with pytest.warns(UserWarning, match=r"d\.csv: Skipping line 3: expected 2 fields, saw 3"):
        rows = read_rows(csv, "skip")
    with pytest.raises(DataError, match=r"d\.csv row 2: missing field 'text'"):  # the empty text of line 4
        task.prepare(tok, rows, train=True)

    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list([good, {"text": None, "label": "on"}]).to_parquet(str(parquet))
    with pytest.raises(DataError, match=r"d\.parquet row 2: missing field 'text'"):
        task.prepare(tok, read_rows(parquet), train=True)
    with pytest.warns(UserWarning, match=r"d\.parquet row 2"):
        assert len(task.prepare(tok, read_rows(parquet), train=True, on_error="skip")) == 1


# ---- runs ------------------------------------------------------------------------------------------------------


def _evaluate(tmp_path, model, data, *extra):
    out = tmp_path / f"eval-{len(list(tmp_path.glob('eval-*')))}"
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--out", str(out), *extra]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return json.loads((out / "metrics.json").read_text())["metrics"], rows, out


@pytest.mark.parametrize("method", ["full", "lora", "prefix"])
def test_finetune_then_evaluate_its_best_folder_reproduces_the_best_evaluation(tmp_path, tiny, method):
    path = _config(tmp_path, tiny, method={"name": method})
    assert main(["finetune", "--config", str(path)]) == 0
    run = tmp_path / "run"
    best = json.loads((run / "best" / "best.json").read_text())
    held = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in held if "eval/accuracy" in r] == [3, 6]
    assert best["accuracy"] == max(r["eval/accuracy"] for r in held if "eval/accuracy" in r)
    assert (run / "history.png").stat().st_size > 0 and (run / "final" / "finetune.json").is_file()
    metrics, rows, out = _evaluate(tmp_path, run / "best", tmp_path / "val.jsonl")  # the task from finetune.json
    assert metrics["accuracy"] == pytest.approx(best["accuracy"]) and metrics["loss"] == pytest.approx(best["loss"])
    assert len(rows) == 8 and rows[0]["where"].endswith("val.jsonl line 1") and set(rows[0]["scores"]) == {"on", "off"}
    assert sum(r["prediction"] == r["gold"] for r in rows) / 8 == metrics["accuracy"]
    assert (out / "confusion.png").is_file()
    kind = {"full": "config.json", "lora": "adapter_config.json", "prefix": "model.safetensors"}[method]
    assert (run / "best" / kind).is_file()
    if method != "full":
        base_names = {"glm.transformer.layers.0.attention.query_key_value.weight"}
        assert not base_names & set(_tensor_names(run / "best"))


def _tensor_names(folder):
    from safetensors import safe_open

    names = []
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            names += list(s.keys())
    return names


def test_a_resumed_lora_run_through_the_cli_ends_where_an_uninterrupted_one_does(tmp_path, tiny):
    def run(name, *extra):
        (tmp_path / name).mkdir(exist_ok=True)
        path = _config(tmp_path / name, tiny, method={"name": "lora"})
        assert main(["finetune", "--config", str(path), *extra]) == 0
        return load_for_evaluation(tmp_path / name / "run" / "final")[0]

    whole = run("a")
    run("b", "--max-steps", "3", "--set", "train.decay_iters=6")  # the same schedule, stopped halfway
    resumed = run("b")
    for (k, v), w in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_classification_trains_the_pooled_cls_head_and_its_folder_loads_in_transformers(tmp_path, tiny):
    from transformers import AutoModelForSequenceClassification

    task = {"name": "classification", "labels": ["on", "off"], "template": "{text}"}
    path = _config(tmp_path, tiny, task=task)
    assert main(["finetune", "--config", str(path)]) == 0
    best = tmp_path / "run" / "best"
    metrics, rows, _ = _evaluate(tmp_path, best, tmp_path / "val.jsonl")
    assert metrics["accuracy"] == pytest.approx(json.loads((best / "best.json").read_text())["accuracy"])
    probs = rows[0]["scores"]
    assert set(probs) == {"on", "off"} and sum(probs.values()) == pytest.approx(1.0)
    hf = AutoModelForSequenceClassification.from_pretrained(best)
    assert hf.config.id2label == {0: "on", 1: "off"}
    with pytest.raises(ConfigError, match=r"classification does not run on .* \(a language model\): it needs GLMFor"):
        main(["--debug", "evaluate", "--model", str(tiny), "--data", str(tmp_path / "val.jsonl"),
              "--task", "classification", "--option", "labels=[on, off]", "--out", str(tmp_path / "x")])  # fmt: skip


def test_the_kjv_example_config_runs_on_the_bundled_model_through_python_m_glmkit(tmp_path):
    """configs/finetune-kjv-cloze.yaml (LoRA, merged) for 2 steps on a few verses of each label, in a subprocess."""
    labels = ["law", "history", "wisdom", "prophets", "gospels", "letters"]
    verses = [{"text": f"And the word of the LORD came unto him, saying {i}.", "label": lab}
              for i, lab in enumerate(labels * 2)]  # fmt: skip
    data = _jsonl(tmp_path / "kjv.jsonl", verses)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "glmkit", "finetune", "--config", str(REPO / "configs" / "finetune-kjv-cloze.yaml"),
        "--train", str(data), "--validation", str(data), "--max-steps", "2", "--eval-every", "1", "--batch-size", "6",
        "--out", str(out), "--set", "train.progress=false", "--set", "train.eval_batch_size=12",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "best accuracy" in done.stdout
    assert (out / "best" / "adapter_config.json").is_file() and (out / "best" / "merged" / "config.json").is_file()
    metrics, rows, _ = _evaluate(tmp_path, out / "best" / "merged", data, "--config",
                                 str(REPO / "configs" / "finetune-kjv-cloze.yaml"))  # fmt: skip
    best = json.loads((out / "best" / "best.json").read_text())
    assert metrics["accuracy"] == pytest.approx(best["accuracy"]) and len(rows) == 12


def test_multiple_choice_ranks_each_example_s_own_choices_and_reloads(tmp_path, tiny):
    """Examples with 2 and 3 choices share batches (placeholder rows masked); the folder reloads to the same
    accuracy, and each row's probabilities are a softmax over its own choices."""
    rows = [{"text": f"the {n} is", "choices": ["on", "off", "on ."][: 2 + i % 2], "label": i % 2}
            for i, n in enumerate(NOUNS)]  # fmt: skip
    data = _jsonl(tmp_path / "mc.jsonl", rows)
    task = {"name": "multiple_choice", "template": "{text}"}
    path = _config(tmp_path, tiny, task=task, data={"train": str(data), "validation": str(data)})
    assert main(["finetune", "--config", str(path)]) == 0
    best = tmp_path / "run" / "best"
    metrics, out, _ = _evaluate(tmp_path, best, data)
    assert metrics["accuracy"] == pytest.approx(json.loads((best / "best.json").read_text())["accuracy"])
    assert [len(r["scores"]) for r in out] == [2 + i % 2 for i in range(len(NOUNS))]
    assert all(sum(r["scores"].values()) == pytest.approx(1.0) for r in out)
    assert metrics["accuracy"] == sum(r["prediction"] == r["gold"] for r in out) / len(out)
    assert metrics["loss"] == pytest.approx(-sum(math.log(r["scores"][r["gold"]]) for r in out) / len(out), rel=1e-5)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "the lamp is", "choices": ["on", "off"], "label": 2}])
    with pytest.raises(DataError, match=r"bad\.jsonl line 1: label 2 is not an index into its 2 choices"):
        main(["--debug", "evaluate", "--model", str(best), "--data", str(bad), "--out", str(tmp_path / "b")])
