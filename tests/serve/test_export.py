"""``glmkit export-triton``: every config.pbtxt parses as Triton's ModelConfig and passes its load-time checks,
and every exported model.py runs against a stand-in for triton_python_backend_utils, giving the native server's
answers."""

import importlib.util
import sys
import time

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from glmkit.cli import main
from glmkit.generate import generate
from glmkit.prompts import continuation_ids
from glmkit.serve.scoring import Scorer, ScoreRow
from glmkit.serve.text import safe_decode
from tests.serve import fake_pb_utils as pb


@pytest.fixture(scope="module")
def repo(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    assert main(["export-triton", str(out), "--model", str(model_dir), "--max-batch-size", "4"]) == 0
    return out


def parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_configs_parse_and_pass_triton_checks(repo):
    names = sorted(p.name for p in repo.iterdir())
    assert names == ["glm_embed", "glm_logits", "glm_score", "llm"]
    for name in names:
        cfg = parse(repo / name / "config.pbtxt")
        assert cfg.name == name and cfg.backend == "python" and not cfg.platform
        assert (repo / name / "1" / "model.py").is_file()
        assert cfg.max_batch_size >= 0 and len(cfg.instance_group) == 1
        assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        db = cfg.dynamic_batching
        assert all(1 <= s <= cfg.max_batch_size for s in db.preferred_batch_size)
        if db.priority_levels:
            assert 1 <= db.default_priority_level <= db.priority_levels
        assert not (db.preserve_ordering and db.priority_levels > 1)
        assert "checkpoint" in cfg.parameters
    llm = parse(repo / "llm" / "config.pbtxt")
    assert llm.max_batch_size == 0 and llm.model_transaction_policy.decoupled
    assert [i.name for i in llm.input] == ["text_input", "stream", "sampling_parameters", "exclude_input_in_output"]
    assert [i.optional for i in llm.input] == [False, True, True, True]
    assert llm.input[0].data_type == model_config_pb2.TYPE_STRING and list(llm.input[0].dims) == [1]
    assert [o.name for o in llm.output] == ["text_output", "finish_reason"]
    score = parse(repo / "glm_score" / "config.pbtxt")
    assert score.max_batch_size == 4 and score.HasField("dynamic_batching")
    assert score.dynamic_batching.max_queue_delay_microseconds == 1000
    assert score.dynamic_batching.default_queue_policy.max_queue_size == 256
    assert (repo / "llm" / "1" / "checkpoint" / "config.json").is_file()


def load_model(repo, name):
    sys.modules["triton_python_backend_utils"] = pb
    spec = importlib.util.spec_from_file_location(f"exported_{name}", repo / name / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    m = module.TritonPythonModel()
    config = (repo / name / "config.pbtxt").read_text()
    from google.protobuf import json_format

    parsed = text_format.Parse(config, model_config_pb2.ModelConfig())
    as_json = json_format.MessageToJson(parsed, preserving_proto_field_name=True)  # Triton writes snake_case
    args = {
        "model_config": as_json,
        "model_instance_kind": "CPU",
        "model_instance_device_id": "0",
        "model_repository": str(repo / name),
        "model_version": "1",
        "model_name": name,
    }
    m.initialize(args)
    return m


def text(s):
    return pb.Tensor("text_input", np.array([s.encode()], dtype=object))


def test_decoupled_llm_streams_then_final(repo, model_and_tokenizer):
    model, tok = model_and_tokenizer
    m = load_model(repo, "llm")
    try:
        params = {"max_tokens": 8, "temperature": 0}
        streamed = pb.InferenceRequest(
            {"text_input": text("the king said"), "stream": pb.Tensor("stream", np.array([True]))}, params
        )
        whole = pb.InferenceRequest({"text_input": text("the king said")}, params)
        bad = pb.InferenceRequest({"text_input": text("x")}, {"max_tokens": -1})
        cancelled = pb.InferenceRequest(
            {"text_input": text("a"), "stream": pb.Tensor("stream", np.array([True]))},
            {"max_tokens": 40, "temperature": 0, "ignore_eos": True},
            pb.ResponseSender(cancel_after=2),
        )
        assert m.execute([streamed, whole, bad, cancelled]) is None
        for r in (streamed, whole, bad, cancelled):
            assert r.sender.done.wait(30)
            assert r.sender.final_flags == 1
        expected = "the king said" + safe_decode(
            tok, generate(model, continuation_ids(tok, "the king said"), max_new_tokens=8).new_tokens[0]
        )
        chunks = [r.output("text_output")[0].decode() for r in streamed.sender.responses]
        assert chunks and "".join(chunks) == expected
        assert [r.output("text_output")[0].decode() for r in whole.sender.responses] == [expected]
        assert bad.sender.responses[0].error is not None and "max_tokens" in bad.sender.responses[0].error.message()
        assert len(cancelled.sender.responses) == 2
        engine = m.impl.engine.engine
        for _ in range(500):  # up to 10 s: a loaded machine may take a while to abort
            if not engine.has_unfinished_requests():
                break
            time.sleep(0.02)
        assert engine.scheduler.num_free_slots == engine.config.max_num_seqs
    finally:
        m.finalize()


def test_batched_score_model(repo, model_and_tokenizer):
    model, tok = model_and_tokenizer
    m = load_model(repo, "glm_score")

    def req(ctx, cont):
        return pb.InferenceRequest(
            {
                "text_input": pb.Tensor("text_input", np.array([[c.encode()] for c in ctx], dtype=object)),
                "continuation": pb.Tensor("continuation", np.array([[c.encode()] for c in cont], dtype=object)),
            }
        )

    bad = pb.InferenceRequest({"text_input": pb.Tensor("text_input", np.array([[b"\xff"]], dtype=object))})
    responses = m.execute([req(["the king", "go"], ["said", "and"]), bad, req(["land"], ["of"])])
    assert len(responses) == 3 and responses[1].error is not None
    lp = responses[0].output("logprob")
    assert lp.shape == (2, 1) and responses[2].output("logprob").shape == (1, 1)
    scorer = Scorer(model, tok.special)
    alone = scorer([[scorer.check(ScoreRow("loglikelihood", continuation_ids(tok, "go"), tok.encode("and")))]])
    assert abs(float(lp[1, 0]) - alone[0][0].logprob) < 1e-4
    embed = load_model(repo, "glm_embed")
    out = embed.execute(
        [pb.InferenceRequest({"text_input": pb.Tensor("text_input", np.array([[b"a"]], dtype=object))})]
    )
    assert out[0].output("embedding").shape == (1, model.config.n_embd)


def test_a_bf16_export_holds_its_weights_in_panels(model_dir, tmp_path):
    """As ``glmkit serve``, an exported bf16 model's instances keep their linear weights in panels only, and answer."""
    from glmkit import kernels

    if not kernels.available():
        pytest.skip("needs glmkit's kernels")
    out = tmp_path / "repo"
    assert main(["export-triton", str(out), "--model", str(model_dir), "--dtype", "bfloat16"]) == 0
    m = load_model(out, "llm")
    try:
        linears = [x for x in m.impl.engine.engine.model.modules() if isinstance(x, kernels.FastLinear)]
        assert linears and all(x.released for x in linears)
        request = pb.InferenceRequest({"text_input": text("the king said")}, {"max_tokens": 4, "temperature": 0})
        m.execute([request])
        assert request.sender.done.wait(30) and request.sender.responses[0].error is None
        assert request.sender.responses[0].output("text_output")[0].decode().startswith("the king said")
    finally:
        m.finalize()


def test_the_repository_is_written_whole_or_not_at_all(model_dir, tmp_path, monkeypatch, capsys):
    import shutil

    out = tmp_path / "repo"
    out.mkdir()
    (out / "other").write_text("not ours")
    assert main(["export-triton", str(out), "--model", str(model_dir)]) == 2  # a non-empty folder is refused
    assert "is not empty" in capsys.readouterr().err and (out / "other").read_text() == "not ours"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", fail)  # the checkpoint copy, the last big write, fails
    fresh = tmp_path / "fresh"
    assert main(["export-triton", str(fresh), "--model", str(model_dir)]) == 2
    assert not fresh.exists() and [p.name for p in tmp_path.iterdir()] == ["repo"]  # no half repository, no temp
    monkeypatch.undo()
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    assert main(["export-triton", str(fresh), "--model", str(broken)]) == 2
    assert "model.safetensors" in capsys.readouterr().err and not fresh.exists()
