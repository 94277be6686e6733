"""Instruction prompt tuning (Med-PaLM's "hard-soft hybrid", Singhal et al. 2022 §3.3.3): a learned soft prompt of
``n_virtual`` tokens in front of the hard prompt (instruction, exemplars, question), trained on a few (prompt → ideal
answer) exemplars while the model stays frozen.

The soft prompt is a P-tuning v2 prefix (``glmkit.finetune.peft.add_prefix``): learned keys and values in front of
every layer's, where Lester et al.'s prompt tuning (and Med-PaLM) learn input embeddings only. Each exemplar is
trained as ``glmkit generate`` answers it: the prompt is Part A continued at a ``[gMASK]`` blank and the answer
its Part B (``glmkit.finetune.Seq2SeqTask``), so the tuned model answers at inference the very layout it learned;
the loop is ``glmkit.finetune.finetune`` (``glmkit.train.loop.fit`` with the task's loss), AdamW. The result is
saved adapter-only (``save_prefix``: the released P-tuning layout) and served with ``glmkit generate / chat /
serve --prefix DIR``.

Defaults, Med-PaLM's where it states them, scaled to a small model: AdamW with lr 3e-3 and weight decay 1e-5 (its
chosen point of the grid {1e-3, 3e-3, 1e-2} × {1e-3, 1e-5}), batch 32, 200 steps, constant learning rate, fp32. Its
100 virtual tokens were ~5 % of PaLM's 2,048-token context; here 16 tokens, ~6 % of the bundled model's 257
positions. The prefix is initialised as add_prefix does (N(0, 1), the hub's PrefixEncoder), not U(−0.5, 0.5).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..finetune.peft import PrefixTunedGLM, add_prefix, count_parameters, save_prefix
from ..finetune.run import FinetuneArgs, finetune
from ..finetune.seq2seq import Seq2SeqTask
from ..model import GLM
from ..prompts import layout, text_prompt
from ..train.loop import TrainArgs


@dataclass(frozen=True)
class SoftPromptConfig:
    """How a soft prompt is tuned (Med-PaLM's IPT settings, scaled; see the module docstring)."""

    n_virtual: int = 16
    """Virtual tokens of the soft prompt (the prefix length)."""
    steps: int = 200
    lr: float = 3e-3
    weight_decay: float = 1e-5
    batch_size: int = 32
    """Exemplars per step (all of them when there are fewer)."""
    max_answer_tokens: int = 64
    """Answer tokens trained at most (``<eop>`` included); a longer answer is cut."""
    seed: int = 1234
    precision: str = "fp32"
    """``fp32``, or ``bf16`` autocast (the loop's default for pretraining; on a CPU without native bf16, e.g. AVX2
    only, it is several times slower than fp32, and the prefix is small)."""

    def __post_init__(self) -> None:
        for name in ("n_virtual", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be positive, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay!r}")
        if self.max_answer_tokens < 2:
            raise ValueError(f"max_answer_tokens: need at least 2 (one token and <eop>), got {self.max_answer_tokens}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision: expected bf16 or fp32, got {self.precision!r}")


def _check_examples(examples: Sequence[tuple[str, str]], tokenizer: Any, room: int, n_virtual: int) -> None:
    """Every exemplar is a (prompt, answer) pair of non-empty strings whose laid-out prompt fits beside the prefix:
    a prompt is never cut silently (its question is at its end)."""
    if not examples:
        raise ValueError("examples: none given; instruction prompt tuning needs (prompt, answer) exemplars")
    prompts = layout(tokenizer.special)
    for i, pair in enumerate(examples):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise ValueError(f"examples[{i}]: expected a (prompt, answer) pair of strings, got {pair!r}")
        prompt, answer = pair
        if not prompt.strip() or not answer.strip():
            raise ValueError(f"examples[{i}]: the {'prompt' if not prompt.strip() else 'answer'} is empty")
        n = len(text_prompt(prompts, tokenizer.encode(prompt)))
        if n > room:
            raise ValueError(
                f"examples[{i}]: the prompt takes {n} positions, the {n_virtual} virtual tokens leave {room} of the "
                "model's context; shorten the prompt or use fewer virtual tokens"
            )


def tune_soft_prompt(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[tuple[str, str]],
    out_dir: str | Path,
    config: SoftPromptConfig | None = None,
    resume: bool = False,
    progress: bool = False,
) -> PrefixTunedGLM:
    """Learn a soft prompt on ``examples`` (``(prompt_text, answer_text)``; the prompt is the whole hard prompt:
    instruction, exemplars and question, and the answer its exact continuation, spaces included: ``" Abraham"``
    after ``"Answer:"``, ``"B)"`` after ``"Answer: ("``) with ``model`` frozen, and save it to ``out_dir/prefix``
    (adapter-only, ``save_prefix``; ``out_dir/prefix/tuning.json`` records the settings and losses).

    ``model``: a GLM (a prefix of ``config.n_virtual`` tokens is added), or a prefixed GLM (``load_prefix``), whose
    prefix goes on training. The loop's checkpoints go to ``out_dir/checkpoints``; ``resume`` continues from them.
    Returns the prefixed model in eval mode. A prefix that leaves no room for the prompts raises ``ValueError``
    naming ``n_virtual``.
    """
    config = config or SoftPromptConfig()
    if isinstance(model, PrefixTunedGLM):
        if model.pre_seq_len != config.n_virtual:
            raise ValueError(
                f"n_virtual: the model's prefix has {model.pre_seq_len} virtual tokens, the config asks for "
                f"{config.n_virtual}"
            )
        base, tuned = model.model, model
    elif isinstance(model, GLM):
        base, tuned = model, None
    else:
        raise TypeError(f"model: expected a glmkit GLM (or one with a prefix), got {type(model).__name__}")
    context = base.config.n_positions
    room = context - config.n_virtual
    if room < 3:  # [CLS], one prompt token and the [gMASK] blank
        raise ValueError(
            f"n_virtual: {config.n_virtual} virtual tokens overflow the model's context of {context} positions, "
            f"leaving no room for a prompt; at most {context - 3}"
        )
    _check_examples(examples, tokenizer, room, config.n_virtual)
    if tuned is None:
        tuned = add_prefix(base, config.n_virtual)
    for name, p in tuned.named_parameters():  # the model stays frozen, whatever it was before
        p.requires_grad_(name.startswith("prefix_encoder."))

    out = Path(out_dir)
    task = Seq2SeqTask(
        name="soft-prompt", max_source_length=room, max_target_length=config.max_answer_tokens, target_space=False
    )
    train = TrainArgs(
        out_dir=str(out),
        max_steps=config.steps,
        micro_batch_size=min(config.batch_size, len(examples)),
        lr=config.lr,
        weight_decay=config.weight_decay,
        decay_style="constant",
        warmup=0.0,
        precision=config.precision,  # type: ignore[arg-type]
        seed=config.seed,
        eval_every=config.steps,
        save_every=config.steps,
        keep_checkpoints=1,
        log_every=max(1, config.steps // 20),
        progress=progress,
        pad_to_multiple=8,  # the loop pads to 64 for pretraining's varied lengths; a few short prompts waste less
    )
    rows = [{"source": p, "target": a} for p, a in examples]
    start = time.perf_counter()
    history = finetune(tuned, tokenizer, task, rows, args=FinetuneArgs(train=train), resume=resume)
    tuned.eval()
    save_prefix(tuned, out / "prefix")
    record = {
        "config": dataclasses.asdict(config),
        "examples": len(examples),
        "parameters": dataclasses.asdict(count_parameters(tuned)),
        "first_loss": history.losses[0] if history.losses else None,
        "final_loss": history.losses[-1] if history.losses else None,
        "steps_run": len(history.losses),
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / "prefix" / "tuning.json").write_text(json.dumps(record, indent=2) + "\n")
    return tuned
