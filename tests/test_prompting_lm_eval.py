"""lm-evaluation-harness over glmkit, offline: a local multiple-choice task YAML (``dataset_path: json`` with a local
jsonl) read into glmkit ``Question`` items and evaluated by lm-eval's own ``simple_evaluate`` with ``--model glmkit``
on the bundled model, whose accuracy equals glmkit's own log-likelihood choice on the same items; the rolling
log-likelihood and generation requests equal glmkit's language-model scoring and ``generate_text``."""

import json
from types import SimpleNamespace

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from glmkit.bundled import load_model_and_tokenizer
from glmkit.cli import main
from glmkit.finetune.lm import LMTask
from glmkit.generate.cli import generate_text
from glmkit.prompting.lm_eval_adapter import GlmkitLM, load_lm_eval_task
from glmkit.prompts import continuation_ids
from glmkit.serve.scoring import Scorer, ScoreRow

DOCS = [
    ("Who begat Isaac?", ["Abraham", "Moses", "David"], 0),
    ("Who led the children of Israel out of Egypt?", ["Noah", "Moses", "Saul"], 1),
    ("Who slew Goliath?", ["David", "Jacob", "Aaron"], 0),
    ("Who built the ark?", ["Pharaoh", "Joseph", "Noah"], 2),
    ("Who was sold into Egypt by his brethren?", ["Joseph", "Isaac", "Esau"], 0),
    ("In the beginning God created the heaven and the", ["earth", "sea", "fire"], 0),
]
YAML = """task: kjv_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
description: "Answer the question about the Bible.\\n\\n"
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_task")
    rows = [{"question": q, "choices": c, "label": a} for q, c, a in DOCS]
    (folder / "kjv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "kjv_mc.yaml").write_text(YAML.format(data=folder / "kjv.jsonl"))
    return folder


@pytest.fixture(scope="module")
def glm():
    torch.set_num_threads(1)
    model, tok = load_model_and_tokenizer(None)
    return GlmkitLM(model=model, tokenizer=tok, batch_size=8)


def test_task_yaml_becomes_questions(task_dir):
    questions = load_lm_eval_task(task_dir / "kjv_mc.yaml")
    assert [q.answer for q in questions] == ["A", "B", "A", "C", "A", "A"]
    q = questions[1]
    assert (
        q.question
        == "Answer the question about the Bible.\n\nQuestion: Who led the children of Israel out of Egypt?\nAnswer:"
    )
    assert q.options == {"A": "Noah", "B": "Moses", "C": "Saul"} and q.line == 2 and q.source == "lm-eval:kjv_mc"
    assert q.meta["target_delimiter"] == " " and q.meta["doc"]["label"] == 1
    with pytest.raises(ValueError, match="task: 'nope' is not defined"):
        load_lm_eval_task(task_dir / "kjv_mc.yaml", task="nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_lm_eval_task(task_dir / "missing.yaml")


def test_simple_evaluate_with_the_glmkit_adapter_equals_glmkit_loglikelihood_choice(task_dir, glm):
    assert get_model("glmkit") is GlmkitLM  # importing the adapter registered it
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(model=glm, tasks=["kjv_mc"], task_manager=manager, bootstrap_iters=0, log_samples=False)
    acc = out["results"]["kjv_mc"]["acc,none"]

    scorer, tok = Scorer(glm.model, glm.tok.special), glm.tok
    questions = load_lm_eval_task(task_dir / "kjv_mc.yaml")
    right = 0
    for q in questions:
        rows = [
            scorer.check(ScoreRow("loglikelihood", continuation_ids(tok, q.question), tok.encode(" " + text)))
            for text in q.options.values()
        ]
        scores = [r[0].logprob for r in scorer([[r] for r in rows])]
        right += q.letters[scores.index(max(scores))] == q.answer
    assert acc == pytest.approx(right / len(questions))
    assert 0 < right < len(questions)  # the model tells some apart and not others: the equality is not vacuous


def test_rolling_loglikelihood_and_generation_are_glmkits(glm):
    text = " ".join(["And God said, Let there be light: and there was light."] * 40)  # several 257-position windows
    (rolling,) = glm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    task = LMTask(max_length=glm.model.config.n_positions, overlap=32)
    items = task.prepare(glm.tok, [{"text": text}], train=False)
    assert len(items) > 1
    assert rolling == pytest.approx(-sum(sum(row) for row in task.token_nll(glm.model, items)), rel=1e-4)

    context = "In the beginning God created"
    (out,) = glm.generate_until([SimpleNamespace(args=(context, {"until": ["."], "max_gen_toks": 12}))])
    full = generate_text(glm.model, glm.tok, context, max_new_tokens=12, kernels=False)[0].spans[0]
    assert out == full.split(".")[0] and "." not in out


def test_glmkit_lm_eval_command_runs_lm_evals_cli(task_dir, tmp_path, capsys):
    args = ["lm-eval", "run", "--model", "glmkit", "--tasks", "kjv_mc", "--include_path", str(task_dir)]
    assert main([*args, "--limit", "2", "--output_path", str(tmp_path / "out")]) == 0
    assert "kjv_mc" in capsys.readouterr().out
    (result,) = tmp_path.glob("out/**/results_*.json")
    assert json.loads(result.read_text())["results"]["kjv_mc"]["acc,none"] in (0.0, 0.5, 1.0)
    assert main(["lm-eval"]) == 2
    assert "give lm-eval's command" in capsys.readouterr().err
