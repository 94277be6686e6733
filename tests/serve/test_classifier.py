"""``glm_classify``: a fine-tuned classifier behind the real ``tritonclient.http`` (the server speaks HTTP only) on
a live ``glmkit serve``, and in an exported Triton repository. A tiny sequence classifier saved by ``glmkit.hf``
(random head) and a tiny cloze model (a GLM + ``finetune.json`` naming a cloze task) answer exactly what the
in-process model answers (``AutoModelForSequenceClassification``; ``glmkit.finetune.cloze.predict``), alone, in a
batch and under concurrent load that the dynamic batcher gathers; bad input is a 400 that names the problem."""

import asyncio
import json
import shutil

import numpy as np
import pytest
import torch
import tritonclient.http as th
import tritonclient.http.aio as tha
from tritonclient.utils import InferenceServerException

from glmkit.bundled import load_model_and_tokenizer
from glmkit.cli import main
from glmkit.config import ConfigError
from glmkit.serve.classifier import find_classifier
from tests.serve import fake_pb_utils as pb
from tests.serve.conftest import LiveServer
from tests.serve.test_export import load_model, parse

LABELS = {0: "royal", 1: "holy", 2: "place"}
CLOZE = {
    "name": "cloze",
    "pattern": "{text} It is about the[MASK].",
    "verbalizer": {"holy": " lord", "place": " land", "people": " them", "deed": " done"},
}
TEXTS = ["the king said", "go and see what the lord hath done in the land of egypt", "them", "for ever and ever"]


@pytest.fixture(scope="module")
def clf_dir(model_dir, tmp_path_factory):
    """A sequence classifier saved by glmkit.hf's save_pretrained, with the tokenizer beside it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("classifier") / "clf"
    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3, id2label=LABELS)
    with torch.no_grad():  # a head far from zero, so the labels differ between texts
        for p in clf.classifier.parameters():
            p.normal_(0, 1.0)
    clf.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cloze_dir(model_dir, tmp_path_factory):
    """A GLM and the finetune.json glmkit finetune writes beside a cloze model."""
    folder = tmp_path_factory.mktemp("cloze") / "best"
    shutil.copytree(model_dir, folder)
    (folder / "finetune.json").write_text(json.dumps({"task": CLOZE, "method": {"name": "full"}, "base_model": None}))
    return folder


def serve_folder(folder):
    from glmkit.serve.batcher import DynamicBatchingConfig, QueuePolicy
    from glmkit.serve.scheduler import SchedulerConfig
    from glmkit.serve.server import ServeOptions, build_state

    model, tok = load_model_and_tokenizer(folder)
    options = ServeOptions(
        scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=256, max_model_len=130),
        batching=DynamicBatchingConfig(
            max_batch_size=8, max_queue_delay_microseconds=20000, default_queue_policy=QueuePolicy(max_queue_size=64)
        ),
        classifier=find_classifier(folder, model.config.n_positions),
    )
    return LiveServer(build_state(model, tok, options))


@pytest.fixture(scope="module")
def head_server(clf_dir):
    server = serve_folder(clf_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cloze_server(cloze_dir):
    server = serve_folder(cloze_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def head_reference(clf_dir):
    """Each text's logits from the in-process transformers model, alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(clf_dir).eval()
    tok = AutoTokenizer.from_pretrained(clf_dir)

    def logits(text):
        with torch.no_grad():
            return model(**tok([text], return_tensors="pt")).logits[0].numpy()

    return logits


@pytest.fixture(scope="module")
def cloze_reference(cloze_dir):
    """Each text's verbalizer scores from glmkit.finetune's cloze scorer, alone."""
    from glmkit.finetune.cloze import predict
    from glmkit.finetune.registry import build_task

    model, tok = load_model_and_tokenizer(cloze_dir)
    task = build_task("cloze", {k: v for k, v in CLOZE.items() if k != "name"}, model.config.n_positions)

    def logits(text):
        items = task.prepare(tok, [{"text": text}], train=False)
        return np.array(next(iter(predict(model.eval(), items)))[0], dtype=np.float32)

    return logits


def texts(rows, binary=True, name="TEXT"):
    t = th.InferInput(name, [len(rows), 1], "BYTES")
    t.set_data_from_numpy(np.array([[r.encode()] for r in rows], dtype=object), binary_data=binary)
    return t


def answers(client, rows, binary=True):
    res = client.infer("glm_classify", [texts(rows, binary)])
    return res.as_numpy("LOGITS"), [x[0].decode() for x in res.as_numpy("LABEL")]


@pytest.fixture(params=["head", "cloze"])
def served(request):
    """(server, reference logits of a text, label names) of each kind."""
    if request.param == "head":
        return request.getfixturevalue("head_server"), request.getfixturevalue("head_reference"), list(LABELS.values())
    return (
        request.getfixturevalue("cloze_server"),
        request.getfixturevalue("cloze_reference"),
        list(CLOZE["verbalizer"]),
    )


def test_metadata_and_config_describe_the_model(served):
    server, _, labels = served
    c = th.InferenceServerClient(server.url)
    try:
        assert c.is_model_ready("glm_classify") and c.is_model_ready("llm")
        meta = c.get_model_metadata("glm_classify")
        assert meta["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}]
        assert meta["outputs"] == [
            {"name": "LOGITS", "datatype": "FP32", "shape": [-1, len(labels)]},
            {"name": "LABEL", "datatype": "BYTES", "shape": [-1, 1]},
        ]
        config = c.get_model_config("glm_classify")
        assert config["max_batch_size"] == 8 and config["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
        assert [o["dims"] for o in config["output"]] == [[len(labels)], [1]]
        assert json.loads(config["parameters"]["labels"]["string_value"]) == labels
        index = {m["name"]: m["state"] for m in c.get_model_repository_index()}
        assert index["glm_classify"] == "READY"
    finally:
        c.close()


@pytest.mark.parametrize("binary", [True, False])
def test_one_text_and_a_batch_equal_the_in_process_model(served, binary):
    server, reference, labels = served
    c = th.InferenceServerClient(server.url)
    try:
        one, one_label = answers(c, TEXTS[:1], binary)
        batch, batch_labels = answers(c, TEXTS, binary)
    finally:
        c.close()
    assert one.shape == (1, len(labels)) and one.dtype == np.float32 and batch.shape == (len(TEXTS), len(labels))
    expected = np.stack([reference(t) for t in TEXTS])
    np.testing.assert_allclose(one[0], expected[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(batch, expected, atol=1e-4, rtol=1e-4)  # padded together == each alone
    assert one_label == [labels[int(expected[0].argmax())]]
    assert batch_labels == [labels[int(i)] for i in expected.argmax(1)]
    assert all(not np.allclose(batch[i], batch[j]) for i in range(len(TEXTS)) for j in range(i))  # no row copied


def test_concurrent_requests_are_batched_and_each_gets_its_own_row(served):
    server, reference, labels = served
    rows = [f"{TEXTS[i % len(TEXTS)]} {' '.join(['the land'] * (i % 5))}".strip() for i in range(24)]

    async def run():
        c = tha.InferenceServerClient(server.url)
        try:
            before = (await c.get_inference_statistics("glm_classify"))["model_stats"][0]
            results = await asyncio.gather(*(c.infer("glm_classify", [texts([r])]) for r in rows))
            after = (await c.get_inference_statistics("glm_classify"))["model_stats"][0]
        finally:
            await c.close()
        return results, before, after

    results, before, after = asyncio.run(run())
    assert after["inference_count"] - before["inference_count"] == len(rows)
    assert after["execution_count"] - before["execution_count"] < len(rows)
    assert max(b["batch_size"] for b in after["batch_stats"]) > 1  # one execution served several requests
    for row, res in zip(rows, results, strict=True):
        expected = reference(row)
        np.testing.assert_allclose(res.as_numpy("LOGITS")[0], expected, atol=1e-4, rtol=1e-4)
        assert res.as_numpy("LABEL")[0, 0].decode() == labels[int(expected.argmax())]


def test_bad_input_is_400_with_a_message_and_the_server_keeps_serving(served):
    server, reference, _ = served
    c = th.InferenceServerClient(server.url)

    def fails(inputs, match):
        with pytest.raises(InferenceServerException, match=match) as e:
            c.infer("glm_classify", inputs)
        assert e.value.status() == "400"

    try:
        wrong_type = th.InferInput("TEXT", [1, 1], "INT32")
        wrong_type.set_data_from_numpy(np.array([[1]], dtype=np.int32))
        fails([wrong_type], "data-type is 'INT32', model expects 'BYTES'")
        flat = th.InferInput("TEXT", [2], "BYTES")
        flat.set_data_from_numpy(np.array([b"a", b"b"], dtype=object))
        fails([flat], r"shape \[2\] must be \[batch")
        wide = th.InferInput("TEXT", [1, 2], "BYTES")
        wide.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=object))
        fails([wide], "unexpected shape for input 'TEXT'")
        fails([texts(["the king", ""])], "TEXT row 2: empty")
        fails([texts(["the land " * 40])], r"TEXT row 1: \d+ tokens.*exceed the model's context of 65 positions")
        fails([texts(["a"] * 9)], "max_batch_size 8")
        fails([texts(["a"], name="text_input")], "unexpected inference input 'text_input'")
        bad_utf8 = th.InferInput("TEXT", [1, 1], "BYTES")
        bad_utf8.set_data_from_numpy(np.array([[b"\xff\xfe"]], dtype=object))
        fails([bad_utf8], "invalid UTF-8")
        logits, _ = answers(c, TEXTS[:1])  # still serving, the same answer
        np.testing.assert_allclose(logits[0], reference(TEXTS[0]), atol=1e-4, rtol=1e-4)
    finally:
        c.close()


def test_unload_and_load_rebuild_the_classifier(head_server, head_reference):
    c = th.InferenceServerClient(head_server.url)
    try:
        c.unload_model("glm_classify")
        with pytest.raises(InferenceServerException) as e:
            c.infer("glm_classify", [texts(["a"])])
        assert e.value.status() == "404" and "has no available versions" in e.value.message()
        assert c.is_model_ready("glm_score")  # the other views of the GLM stay
        c.load_model("glm_classify")
        logits, _ = answers(c, TEXTS[1:2])
        np.testing.assert_allclose(logits[0], head_reference(TEXTS[1]), atol=1e-4, rtol=1e-4)
    finally:
        c.close()


def test_what_is_served_is_found_and_checked(model_dir, clf_dir, tmp_path, capsys):
    assert find_classifier(model_dir, 65) is None  # a plain GLM: no classifier
    task_file = tmp_path / "finetune.yaml"  # a finetune config: its task section
    task_file.write_text(
        "task:\n  name: cloze\n  pattern: 'Said: {text}[MASK]'\n  verbalizer: {0: ' lord', 1: ' land'}\n"
    )
    found = find_classifier(model_dir, 65, task_file)
    assert found.kind == "cloze" and found.labels == ("0", "1") and found.field == "text"
    bare = tmp_path / "task.json"  # the section alone, name defaulting to cloze
    bare.write_text(json.dumps({"pattern": "{verse}[MASK]", "verbalizer": {"a": " lord", "b": " land"}}))
    assert find_classifier(model_dir, 65, bare).field == "verse"
    for task, match in [
        ({"pattern": "{a} {b}[MASK]", "verbalizer": {"x": " lord"}}, r"fields \['a', 'b'\]"),
        ({"name": "boolq"}, "glm_classify serves a cloze task"),
        ({"pattern": "{text}", "verbalizer": {"x": " lord"}}, r"\[MASK\] exactly once"),
        ({"pattern": "{text}[MASK]", "verbalizer": []}, "verbalizer"),
    ]:
        bare.write_text(json.dumps(task))
        with pytest.raises(ConfigError, match=match):
            find_classifier(model_dir, 65, bare)
    with pytest.raises(ConfigError, match="is a sequence classifier"):
        find_classifier(clf_dir, 65, task_file)
    chatglm = tmp_path / "chatglm"
    chatglm.mkdir()
    (chatglm / "config.json").write_text(json.dumps({"model_type": "chatglm"}))
    with pytest.raises(ConfigError, match="is a ChatGLM"):
        find_classifier(chatglm, 2048, task_file)
    bare.write_text(json.dumps({"pattern": "{a} {b}[MASK]", "verbalizer": {"x": " lord"}}))
    assert main(["serve", "--model", str(model_dir), "--cloze-task", str(bare)]) == 2  # refused before listening
    assert "glm_classify fills exactly one field" in capsys.readouterr().err


def test_glmkit_serve_serves_the_cloze_task_of_a_finetuned_folder(cloze_dir, cloze_reference, tmp_path):
    """The command itself: ``glmkit serve --model best/`` finds the cloze task in finetune.json."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "glmkit", "serve", "--model", str(cloze_dir), "--port", str(port)]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([*cmd, "--max-num-seqs", "2", "--no-playground"], stderr=log)
    c = th.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        for _ in range(600):
            try:
                if c.is_server_ready():
                    break
            except Exception:  # not listening yet
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        logits, labels = answers(c, TEXTS[1:2])
        np.testing.assert_allclose(logits[0], cloze_reference(TEXTS[1]), atol=1e-4, rtol=1e-4)
        assert labels == [list(CLOZE["verbalizer"])[int(logits[0].argmax())]]
    finally:
        c.close()
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def test_a_classifier_glmkit_finetune_trained_lays_text_out_by_its_template(clf_dir, tmp_path):
    """finetune.json's classification template (and max_length) lay TEXT out as in training."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path / "final"
    shutil.copytree(clf_dir, folder)
    task = {"name": "classification", "labels": list(LABELS.values()), "template": "Verse: {text}", "max_length": 8}
    (folder / "finetune.json").write_text(json.dumps({"task": task}))
    model, tok = load_model_and_tokenizer(folder)
    definition = find_classifier(folder, model.config.n_positions)
    assert definition.task["template"] == "Verse: {text}" and definition.task["max_length"] == 8
    scorer = definition.build(model.eval(), tok)
    got = np.stack(scorer([scorer.prepare(TEXTS[:2])])[0])
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    ids = [[hf_tok.cls_token_id, *tok.encode("Verse: " + t)[:6], hf_tok.eos_token_id] for t in TEXTS[:2]]  # cut at 8
    with torch.no_grad():
        expected = np.stack([hf(torch.tensor([row])).logits[0].numpy() for row in ids])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_a_multi_token_verbalizer_is_scored_by_span(cloze_dir):
    """With multi_token the served scores are the span scores of glmkit.finetune (two-token ' king' included)."""
    from glmkit.finetune.cloze import predict

    model, tok = load_model_and_tokenizer(cloze_dir)
    task = {**CLOZE, "verbalizer": {"royal": " king", "holy": " lord"}, "multi_token": True, "length_penalty": 1.0}
    (cloze_dir.parent / "multi.json").write_text(json.dumps(task))
    definition = find_classifier(cloze_dir, model.config.n_positions, cloze_dir.parent / "multi.json")
    scorer = definition.build(model.eval(), tok)
    items = scorer.prepare(TEXTS[:2])
    got = scorer([items[:1], items[1:]])
    task_items = definition.build_task(model.config.n_positions).prepare(
        tok, [{"text": t} for t in TEXTS[:2]], train=False
    )
    expected = [s for s, _, _ in predict(model, task_items)]
    np.testing.assert_allclose(np.stack([got[0][0], got[1][0]]), np.array(expected), atol=1e-5)


# ---- export-triton ------------------------------------------------------------------------------------------


def text_request(rows):
    return pb.InferenceRequest({"TEXT": pb.Tensor("TEXT", np.array([[r.encode()] for r in rows], dtype=object))})


@pytest.mark.parametrize("kind", ["head", "cloze"])
def test_export_writes_a_dynamically_batched_classifier(kind, clf_dir, model_dir, tmp_path, request):
    from tritonclient.grpc import model_config_pb2

    out = tmp_path / "repo"
    if kind == "head":
        args, reference, labels = ["--model", str(clf_dir)], request.getfixturevalue("head_reference"), LABELS
    else:  # a plain GLM made a cloze classifier by a task file
        (tmp_path / "task.json").write_text(json.dumps(CLOZE))
        args = ["--model", str(model_dir), "--cloze-task", str(tmp_path / "task.json")]
        reference, labels = request.getfixturevalue("cloze_reference"), dict(enumerate(CLOZE["verbalizer"]))
    assert main(["export-triton", str(out), *args, "--max-batch-size", "4"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["glm_classify", "glm_embed", "glm_logits", "glm_score", "llm"]
    cfg = parse(out / "glm_classify" / "config.pbtxt")
    assert cfg.backend == "python" and cfg.max_batch_size == 4 and cfg.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("TEXT", model_config_pb2.TYPE_STRING, [1])]
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [
        ("LOGITS", model_config_pb2.TYPE_FP32, [len(labels)]),
        ("LABEL", model_config_pb2.TYPE_STRING, [1]),
    ]
    m = load_model(out, "glm_classify")
    responses = m.execute([text_request(TEXTS[:2]), text_request([""]), text_request(TEXTS[2:3])])
    assert responses[1].error is not None and "TEXT row 1: empty" in responses[1].error.message()
    logits = np.concatenate([responses[0].output("LOGITS"), responses[2].output("LOGITS")])
    expected = np.stack([reference(t) for t in TEXTS[:3]])
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
    names = [x[0].decode() for x in np.concatenate([responses[0].output("LABEL"), responses[2].output("LABEL")])]
    assert names == [labels[int(i)] for i in expected.argmax(1)]
