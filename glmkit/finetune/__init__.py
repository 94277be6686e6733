"""Fine-tuning GLM on tasks: cloze tasks (PET-style patterns and verbalizers, the SuperGLUE set of the GLM paper)
and sequence-to-sequence, all through the one training loop (``glmkit.train.loop.fit``)."""

from .cloze import ClozeTask, score_choices
from .data import DataError, Record, read_jsonl
from .run import FinetuneArgs, evaluate_task, finetune
from .seq2seq import SUMMARIZATION_TEMPLATE, Seq2SeqTask
from .superglue import load_split, superglue_task
from .tasks import BLANK, ClozeExample, Shortenable, Task, shortenable

__all__ = [
    "BLANK",
    "SUMMARIZATION_TEMPLATE",
    "ClozeExample",
    "ClozeTask",
    "DataError",
    "FinetuneArgs",
    "Record",
    "Seq2SeqTask",
    "Shortenable",
    "Task",
    "evaluate_task",
    "finetune",
    "load_split",
    "read_jsonl",
    "score_choices",
    "shortenable",
    "superglue_task",
]
