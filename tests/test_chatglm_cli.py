"""The commands on ChatGLM hub folders (a ChatGLM3-layout and a ChatGLM-6B folder built here with their tokenizers):
``glmkit generate`` lays the text out in the model family's prompt, ``quantize`` writes a checkpoint that reloads to
the in-memory quantized model's logits, ``export-triton`` a repository whose ``llm`` answers as ``generate``,
``compare-decoding`` runs every strategy; and the transformers wrapper reproduces the fixtures' greedy tokens.
Plus item 2 of issue 18: the ChatGLM-6B tokenizer's own ``text [gMASK] <sop>`` ids decode correctly."""

import json

import numpy as np
import pytest
import torch

from glmkit import GLM
from glmkit.bundled import load_model_and_tokenizer
from glmkit.cli import main
from glmkit.generate import generate
from glmkit.hf_adapter import GLMForHFGeneration
from glmkit.prompts import continuation_ids, model_family
from glmkit.quantize import QuantScheme, quantize_model
from glmkit.serve.text import safe_decode
from tests.conftest import FIXTURES
from tests.helpers.chatglm_folders import chatglm3_folder, chatglm6b_folder
from tests.serve import fake_pb_utils as pb
from tests.serve.test_export import load_model, text

from .test_chatglm_hub import hub_quantized_checkpoint


@pytest.fixture(scope="module", params=["chatglm3", "chatglm6b"])
def folder(request, tmp_path_factory):
    make = chatglm3_folder if request.param == "chatglm3" else chatglm6b_folder
    return make(tmp_path_factory.mktemp(request.param) / "model")


def cases(family):
    return {c["name"]: c for c in json.loads((FIXTURES / family / "cases.json").read_text())["cases"]}


def test_generate_takes_the_chatglm6b_tokenizers_own_ids():
    """``text [gMASK] <sop>`` as the tokenizer returns it, alone and as a left-padded tensor batch: the model's family
    lays it out (``<sop>`` is fed by the engine, not kept in the bidirectional prefix) and the hub's greedy tokens
    come out."""
    model = GLM.from_pretrained(FIXTURES / "chatglm6b", dtype=torch.float32)
    assert model_family(model) == "chatglm6b"
    c = cases("chatglm6b")
    no_stop = {"max_new_tokens": 12, "eos_token_id": 3}
    single = c["a_gmask_sop_single"]["input_ids"][0]
    assert single[-2:] == [281, 284]
    assert generate(model, [single], **no_stop).new_tokens == c["d_greedy_single"]["expected_token_ids"]
    batch = c["b_batch2_left_pad"]
    ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor([[0] * p + [1] * (ids.shape[1] - p) for p in batch["left_pad_lengths"]])
    out = generate(model, ids, attention_mask=mask, **no_stop)
    assert out.new_tokens == c["e_greedy_batch2_left_pad"]["expected_token_ids"]


def test_glmkit_generate_command(folder, capsys):
    model, tok = load_model_and_tokenizer(folder)
    family = model_family(model)
    assert main(["generate", "--model", str(folder), "--max-new-tokens", "6", "--json", "你好，世界"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    ids = continuation_ids(tok, "你好，世界", family)
    expected = generate(model, ids, tokenizer=tok, max_new_tokens=6)
    span = expected.new_tokens[0][:-1] if expected.finish_reasons[0] == "stop" else expected.new_tokens[0]
    assert result["tokens"] == [span] and result["prompt_tokens"] == len(ids)
    assert main(["generate", "--model", str(folder), "--max-new-tokens", "4", "--stream", "hello world"]) == 0
    assert capsys.readouterr().out.startswith("hello world")
    if family == "chatglm6b":  # blank filling: the [MASK] is filled in place
        assert main(["generate", "--model", str(folder), "--max-new-tokens", "3", "--json", "你好[MASK]世界"]) == 0
        assert len(json.loads(capsys.readouterr().out)["results"][0]["spans"]) == 1


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_command_reloads_to_the_same_logits(folder, tmp_path, bits):
    out = tmp_path / f"int{bits}"
    assert main(["quantize", str(folder), str(out), "--bits", str(bits)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "chatglm" and "glmkit_quantization" in saved  # the family's hub layout
    tokenizer_files = {f.name for f in folder.iterdir()} - {"config.json", "model.safetensors"}
    assert tokenizer_files and tokenizer_files <= {f.name for f in out.iterdir()}
    reloaded = GLM.from_pretrained(out)
    in_memory = quantize_model(GLM.from_pretrained(folder), QuantScheme(bits, 32 if bits == 4 else None, True))
    assert type(reloaded) is type(in_memory)
    _, tok = load_model_and_tokenizer(out)
    ids = torch.tensor([continuation_ids(tok, "你好，世界", model_family(reloaded))])
    with torch.no_grad():
        assert torch.equal(reloaded(ids), in_memory(ids))
    res = generate(reloaded, ids[0].tolist(), tokenizer=tok, max_new_tokens=4)
    assert res.new_tokens == generate(in_memory, ids[0].tolist(), tokenizer=tok, max_new_tokens=4).new_tokens


def test_quantize_refuses_a_hub_quantized_checkpoint(tmp_path, capsys):
    src, _ = hub_quantized_checkpoint(tmp_path / "int4", 4)
    assert main(["quantize", str(src), str(tmp_path / "again"), "--bits", "8"]) == 2
    assert "already quantized (the hub's int4 format, quantization_bit)" in capsys.readouterr().err


def test_export_triton_llm_answers_as_generate(folder, tmp_path):
    repo = tmp_path / "repo"
    assert main(["export-triton", str(repo), "--model", str(folder)]) == 0
    assert (repo / "llm" / "1" / "checkpoint" / "tokenizer_config.json").is_file()
    model, tok = load_model_and_tokenizer(folder)
    m = load_model(repo, "llm")
    try:
        whole = pb.InferenceRequest({"text_input": text("你好")}, {"max_tokens": 6, "temperature": 0})
        m.execute([whole])
        assert whole.sender.done.wait(30)
        ids = continuation_ids(tok, "你好", model_family(model))
        expected = "你好" + safe_decode(tok, generate(model, ids, tokenizer=tok, max_new_tokens=6).new_tokens[0])
        assert [r.output("text_output")[0].decode() for r in whole.sender.responses] == [expected]
    finally:
        m.finalize()
    score = load_model(repo, "glm_embed")
    request = pb.InferenceRequest({"text_input": pb.Tensor("text_input", np.array([["你好".encode()]], dtype=object))})
    (response,) = score.execute([request])
    assert response.error is None and response.output("embedding").shape == (1, model.config.n_embd)


def test_compare_decoding_command(folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("你好，世界\t今天天气很好\nhello world\t the quick brown fox\n", encoding="utf-8")
    out = tmp_path / "cmp"
    argv = ["compare-decoding", "--model", str(folder), "--prompts", str(prompts), "--max-new-tokens", "4"]
    assert main([*argv, "--out", str(out)]) == 0
    doc = json.loads((out / "compare-decoding.json").read_text())
    rows = {r["name"]: r for r in doc["results"]}
    assert {"human", "greedy", "beam-4", "top-p-0.9"} <= set(rows)
    assert all(np.isfinite(r["perplexity"]) for r in rows.values())
    model, tok = load_model_and_tokenizer(folder)
    ids = continuation_ids(tok, "你好，世界", model_family(model))
    greedy = generate(model, ids, tokenizer=tok, special_tokens=tok.special, max_new_tokens=4)
    span = greedy.new_tokens[0][:-1] if greedy.finish_reasons[0] == "stop" else greedy.new_tokens[0]
    assert rows["greedy"]["texts"][0] == tok.decode(span, skip_special_tokens=True)


@pytest.mark.parametrize("family", ["chatglm2", "chatglm6b"])
def test_transformers_wrapper_reproduces_the_greedy_fixture(family, tmp_path):
    """transformers' own generate() over the wrapped model (full recompute each step, the hub's conventions) gives
    the fixtures' greedy tokens for a left-padded batch, and the saved wrapper reloads through the Auto classes."""
    from transformers import AutoModelForCausalLM

    model = GLM.from_pretrained(FIXTURES / family, dtype=torch.float32)
    c = cases(family)
    if family == "chatglm2":
        batch, expected, no_stop = c["d_greedy_batch2_left_pad"], c["d_greedy_batch2_left_pad"], 319
        ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"]["mask"])
    else:
        batch, expected, no_stop = c["b_batch2_left_pad"], c["e_greedy_batch2_left_pad"], 3
        ids = torch.tensor(batch["input_ids"])
        mask = torch.tensor([[0] * p + [1] * (ids.shape[1] - p) for p in batch["left_pad_lengths"]])
    hf = GLMForHFGeneration.from_glm(model)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=no_stop)
    assert out[:, ids.shape[1] :].tolist() == expected["expected_token_ids"]
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=no_stop)
    assert torch.equal(ours.sequences, out)
    hf.save_pretrained(tmp_path / "hf")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(again.glm) is type(model) and again.family == model_family(model)
    with torch.no_grad():
        assert torch.allclose(again(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits, atol=1e-4)


def test_explain_takes_the_family_of_a_chatglm_folder(folder, capsys):
    from glmkit.chatglm.tokenizers import load_chatglm_tokenizer
    from glmkit.explain import explain
    from glmkit.masks import sample_mask

    if not (folder / "ice_text.model").is_file():  # ChatGLM3: a causal LM, drawn causal at positions 0..n-1
        ex, special = explain("你好，世界", tokenizer=folder, span_length=3), load_chatglm_tokenizer(folder).specials
        s = ex.sample
        assert ex.causal and s.sep == 0 and s.tokens[:2] == [special.gmask, special.sop]  # `[gMASK] sop text`
        assert s.position_ids == list(range(len(s))) and set(s.block_position_ids) == {0}
        assert s.loss_mask == [0] * (len(s) - 3) + [1] * 3
        assert torch.equal(sample_mask(s), torch.ones(len(s), len(s), dtype=torch.bool).tril())
        assert main(["explain", "你好，世界", "--tokenizer", str(folder)]) == 0
        assert "causal" in capsys.readouterr().out
        assert main(["explain", "你好[gMASK]", "--tokenizer", str(folder)]) == 2  # no blanks in a causal prompt
        assert "no blanks" in capsys.readouterr().err
        return
    s, special = explain("你好，世界", tokenizer=folder).sample, load_chatglm_tokenizer(folder).specials
    assert s.tokens[s.sep - 1 : s.sep + 1] == [special.gmask, special.sop]  # `text [gMASK] <sop>`, no [CLS]
    assert s.tokens[0] != special.gmask and s.block_position_ids[s.sep] == 1
    assert main(["explain", "你好[MASK]世界", "--tokenizer", str(folder)]) == 0
