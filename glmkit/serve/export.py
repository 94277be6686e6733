"""``glmkit export-triton``: a Triton model repository whose Python-backend models run glmkit.

Layout (Triton's docs/user_guide/model_configuration.md and decoupled_models.md; the tensor names of
triton-inference-server/vllm_backend): ``llm/`` — decoupled, ``max_batch_size: 0``, vLLM-backend tensor names, with
glmkit's continuous-batching engine inside the instance; ``glm_score/``, ``glm_embed/``, ``glm_logits/`` — dynamically
batched by Triton; ``glm_classify/`` too when the checkpoint is a fine-tuned classifier (classifier.py). Each
``config.pbtxt`` comes from the same specs as the native server, so ``tritonclient`` code works against either. The
checkpoint is copied once into ``llm/1/checkpoint`` (the other models point there) so the repository is
self-contained and can be synced to every Triton node; ``--no-copy`` references the original folder instead. The
Triton Python environment needs torch and glmkit (docs/serving.md).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from ..checkpoint import check_output_folder, load_state_dict, staged_folder
from .batcher import DynamicBatchingConfig, QueuePolicy
from .classifier import ClassifierDef, find_classifier
from .specs import CLASSIFY, LLM, ModelSpec, classifier_spec, llm_spec, one_shot_specs

MODEL_PY = '''"""Triton Python-backend model ({kind}) by `glmkit export-triton`; see glmkit.serve.triton_backend."""

import triton_python_backend_utils as pb_utils

from glmkit.serve.triton_backend import {cls}


class TritonPythonModel:
    def initialize(self, args):
        self.impl = {cls}(args, pb_utils)

    def execute(self, requests):
        return self.impl.execute(requests)

    def finalize(self):
        {finalize}
'''


def _write_model(out: Path, spec: ModelSpec, instance_kind: str, cls: str, kind: str) -> Path:
    folder = out / spec.name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(spec.pbtxt(instance_kind))
    finalize = "self.impl.close()" if cls == "TritonLLM" else "self.impl = None"
    (folder / "1" / "model.py").write_text(MODEL_PY.format(cls=cls, kind=kind, finalize=finalize))
    return folder


def export_triton(
    model: str | Path | None,
    out_dir: str | Path,
    *,
    gpu: bool = False,
    dtype: str = "float32",
    copy: bool = True,
    batching: DynamicBatchingConfig | None = None,
    engine: dict[str, int] | None = None,
    execution_env: str | Path | None = None,
    cloze_task: str | Path | None = None,
) -> list[Path]:
    """Write the repository to ``out_dir``; returns the model folders.

    Args:
        model: checkpoint folder with its tokenizer (``None`` = the bundled model).
        gpu: ``KIND_GPU`` instances (one per GPU by default in Triton) instead of ``KIND_CPU``.
        dtype: torch dtype the instances load the weights in.
        copy: copy the checkpoint into the repository (else reference it by absolute path).
        batching: the one-shot models' dynamic batching (default: up to 16, 1 ms delay, queue of 256).
        engine: ``llm`` engine limits (max_num_seqs, max_num_batched_tokens, max_model_len, max_queue_size, ...).
        execution_env: a conda-pack tarball with torch and glmkit, copied next to each config and named in
            ``EXECUTION_ENV_PATH``.
        cloze_task: a cloze task file for ``glm_classify`` (as ``glmkit serve --cloze-task``); a sequence
            classifier, or a folder whose ``finetune.json`` names a cloze task, gets ``glm_classify`` without it.
    """
    from ..bundled import load_config, model_path

    source = model_path(model)
    final = check_output_folder(out_dir)
    config = load_config(source)
    load_state_dict(source)  # read once: a corrupt or truncated checkpoint is refused here, not by Triton later
    classifier = find_classifier(source, config.n_positions, cloze_task)
    batching = batching or DynamicBatchingConfig(
        max_batch_size=16, max_queue_delay_microseconds=1000, default_queue_policy=QueuePolicy(max_queue_size=256)
    )
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    common = {"dtype": dtype}
    if execution_env is not None:
        common["EXECUTION_ENV_PATH"] = "$$TRITON_MODEL_DIRECTORY/" + Path(execution_env).name
    with staged_folder(final) as out:  # written whole or not at all: a failure or Ctrl-C leaves no half repository
        _write_repository(out, source, config, batching, kind, common, engine, copy, execution_env, classifier)
    names = [LLM] + [spec.name for spec in one_shot_specs(batching, config.n_embd, config.vocab_size)]
    return [final / name for name in names + ([CLASSIFY] if classifier is not None else [])]


def _write_repository(
    out: Path,
    source: Path,
    config: Any,
    batching: DynamicBatchingConfig,
    kind: str,
    common: dict[str, str],
    engine: dict | None,
    copy: bool,
    execution_env: str | Path | None,
    classifier: ClassifierDef | None,
) -> None:
    checkpoint = out / LLM / "1" / "checkpoint"
    llm = llm_spec()
    llm.parameters = {**common, "checkpoint": "1/checkpoint" if copy else str(source.resolve())}
    llm.parameters |= {k: str(v) for k, v in (engine or {}).items()}
    folders = [_write_model(out, llm, kind, "TritonLLM", "decoupled generation")]
    for spec in one_shot_specs(batching, config.n_embd, config.vocab_size):
        ckpt = f"../{LLM}/1/checkpoint" if copy else str(source.resolve())
        spec.parameters = {**common, "checkpoint": ckpt, "glmkit_model": spec.name}
        folders.append(_write_model(out, spec, kind, "TritonOneShot", "dynamically batched one-shot model"))
    if classifier is not None:  # the definition travels inline: the repository needs no task file
        spec = classifier_spec(batching, classifier.labels, classifier.kind)
        ckpt = f"../{LLM}/1/checkpoint" if copy else str(source.resolve())
        spec.parameters |= {**common, "checkpoint": ckpt, "glmkit_classifier": classifier.to_json()}
        folders.append(_write_model(out, spec, kind, "TritonClassifier", "dynamically batched classifier"))
    if copy:
        shutil.copytree(source, checkpoint)
    if execution_env is not None:
        for folder in folders:
            shutil.copy2(execution_env, folder / Path(execution_env).name)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="the model repository to write (must be new or empty)")
    p.add_argument("--model", default=None, help="checkpoint folder with its tokenizer (default: the bundled model)")
    p.add_argument("--gpu", action="store_true", help="KIND_GPU instances (default KIND_CPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-copy", action="store_true", help="reference the checkpoint by path instead of copying it")
    p.add_argument("--max-batch-size", type=int, default=16, help="one-shot models: Triton max_batch_size")
    p.add_argument("--max-queue-delay-us", type=int, default=1000, help="one-shot models: dynamic batching delay")
    p.add_argument("--max-num-seqs", type=int, default=16, help="llm: sequences decoding together per instance")
    p.add_argument("--execution-env", default=None, help="conda-pack tarball with torch + glmkit for the stub")
    p.add_argument(
        "--cloze-task",
        default=None,
        metavar="FILE",
        help="also write glm_classify, the model as a cloze classifier with this task (see glmkit serve --help)",
    )


def run(args: argparse.Namespace) -> int:
    batching = DynamicBatchingConfig(
        max_batch_size=args.max_batch_size,
        max_queue_delay_microseconds=args.max_queue_delay_us,
        default_queue_policy=QueuePolicy(max_queue_size=256),
    )
    folders = export_triton(
        args.model,
        args.out_dir,
        gpu=args.gpu,
        dtype=args.dtype,
        copy=not args.no_copy,
        batching=batching,
        engine={"max_num_seqs": args.max_num_seqs},
        execution_env=args.execution_env,
        cloze_task=args.cloze_task,
    )
    print(f"wrote {len(folders)} models to {args.out_dir}: {', '.join(f.name for f in folders)}")
    print(f"run: tritonserver --model-repository={Path(args.out_dir).resolve()}")
    return 0
