"""Instruction prompt tuning: a soft prompt learned on the bundled model with the model frozen, saved adapter-only,
loaded by ``glmkit generate --prefix`` and ``glmkit chat --prefix`` and served by a real ``glmkit serve --prefix``
process (OpenAI completions and the KServe glm_score model), each equal to the prefixed model in this process."""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from safetensors import safe_open

from glmkit import chat
from glmkit.bundled import load_model_and_tokenizer
from glmkit.cli import main
from glmkit.finetune.peft import load_prefix
from glmkit.generate.cli import generate_text
from glmkit.prompting.tuning import SoftPromptConfig, tune_soft_prompt
from glmkit.prompts import continuation_ids
from glmkit.serve.scoring import Scorer, ScoreRow

HARD = "Answer with the father's name.\nQuestion: Who begat {son}?\nAnswer:"
EXAMPLES = [(HARD.format(son=s), f" {f}") for s, f in [("Isaac", "Abraham"), ("Jacob", "Isaac"), ("Joseph", "Jacob")]]
PROMPT = HARD.format(son="Esau")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    torch.set_num_threads(1)  # a small model on a shared machine: more threads only contend
    out = tmp_path_factory.mktemp("ipt")
    model, tok = load_model_and_tokenizer(None)
    config = SoftPromptConfig(n_virtual=6, steps=6, lr=5e-2, batch_size=3)
    prefixed = tune_soft_prompt(model, tok, EXAMPLES, out, config)
    return out / "prefix", prefixed, tok


def _answer(model, tok, prompt: str = PROMPT) -> str:
    return generate_text(model, tok, prompt, max_new_tokens=4, kernels=False)[0].spans[0]


def test_tuning_trains_the_prefix_only_and_saves_it_adapter_only(tuned):
    folder, prefixed, tok = tuned
    record = json.loads((folder / "tuning.json").read_text())
    assert record["steps_run"] == 6 and record["final_loss"] < record["first_loss"]  # the answers got likelier
    assert record["parameters"]["trainable"] == 6 * 6 * 2 * 320  # 6 tokens x 6 layers x (k, v) x hidden size
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert list(f.keys()) == ["transformer.prefix_encoder.embedding.weight"]
    fresh, _ = load_model_and_tokenizer(None)
    for (name, a), b in zip(prefixed.model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the model stayed frozen
    assert _answer(load_prefix(fresh, folder).eval(), tok) == _answer(prefixed, tok)
    assert _answer(fresh, tok) != _answer(prefixed, tok)  # the soft prompt changes what the model says


def test_glmkit_generate_loads_the_prefix(tuned, capsys):
    folder, prefixed, tok = tuned
    assert main(["generate", PROMPT, "--prefix", str(folder), "--max-new-tokens", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["settings"]["prefix"] == str(folder)
    assert doc["results"][0]["spans"][0] == _answer(prefixed, tok)
    assert main(["generate", PROMPT, "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["spans"][0] != _answer(prefixed, tok)


def test_glmkit_chat_loads_the_prefix(tuned):
    folder, prefixed, tok = tuned
    parser = argparse.ArgumentParser()
    chat.configure(parser)
    backend = chat.load_backend(parser.parse_args(["--prefix", str(folder), "--max-new-tokens", "4"]))
    messages = [{"role": "user", "content": PROMPT}]
    reply = "".join(backend.reply(messages))
    assert reply == "".join(chat.LocalBackend(prefixed, tok, {"max_new_tokens": 4}).reply(messages))
    plain = chat.LocalBackend(load_model_and_tokenizer(None)[0].eval(), tok, {"max_new_tokens": 4})
    assert "".join(plain.reply(messages)) != reply  # the prefix was applied, not dropped


def test_the_prefix_takes_its_room_from_the_context_and_bad_input_is_named(tuned, tmp_path, capsys):
    folder, prefixed, tok = tuned
    # 257 positions: a prompt of 252 fits the bare model but not beside 6 virtual tokens, and is refused up front
    long = " ".join(["and"] * 250)
    assert prefixed.config.n_positions == 257 - 6
    with pytest.raises(ValueError, match="exceed the model's context of 251 positions"):
        generate_text(prefixed, tok, long, max_new_tokens=1)
    model = prefixed.model
    with pytest.raises(ValueError, match=r"n_virtual: 255 virtual tokens overflow the model's context of 257"):
        tune_soft_prompt(model, tok, EXAMPLES, tmp_path, SoftPromptConfig(n_virtual=255))
    with pytest.raises(
        ValueError, match=r"examples\[1\]: the prompt takes 252 positions, the 6 virtual tokens leave 251"
    ):
        tune_soft_prompt(model, tok, [EXAMPLES[0], (long, " x")], tmp_path, SoftPromptConfig(n_virtual=6))
    with pytest.raises(ValueError, match=r"examples\[0\]: the answer is empty"):
        tune_soft_prompt(model, tok, [("Question:", " ")], tmp_path)
    assert main(["generate", "x", "--prefix", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["chat", "--url", "http://127.0.0.1:1", "--prefix", str(folder)]) == 2
    assert "glmkit serve --prefix" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_glmkit_serve_applies_the_prefix_to_completions_and_glm_score(tuned, tmp_path):
    folder, prefixed, tok = tuned
    port, log = _free_port(), tmp_path / "serve.log"
    args = ["serve", "--prefix", str(folder), "--port", str(port), "--max-num-seqs", "2", "--no-playground"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "glmkit", *args], stdout=out, stderr=out, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{base}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert "prefix of 6 virtual tokens" in log.read_text()
        # two prompts of different lengths decoding together in the continuous-batching engine (ragged KV rows)
        prompts = [PROMPT, "In the beginning God created"]

        def complete(prompt: str) -> str:
            body = {"prompt": prompt, "max_tokens": 4, "temperature": 0}
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(2) as pool:
            served = list(pool.map(complete, prompts))
        assert served == [_answer(prefixed, tok, p) for p in prompts]

        body = {
            "inputs": [
                {"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [PROMPT]},
                {"name": "continuation", "shape": [1, 1], "datatype": "BYTES", "data": [" Isaac"]},
            ]
        }
        r = httpx.post(f"{base}/v2/models/glm_score/infer", json=body, timeout=120)
        assert r.status_code == 200, r.text
        served = next(o["data"][0] for o in r.json()["outputs"] if o["name"] == "logprob")
        row = ScoreRow("loglikelihood", continuation_ids(tok, PROMPT), tok.encode(" Isaac"))
        scorer = Scorer(prefixed, tok.special)
        assert served == pytest.approx(scorer([[scorer.check(row)]])[0][0].logprob, abs=1e-4)
        bare = Scorer(load_model_and_tokenizer(None)[0], tok.special)
        assert abs(served - bare([[bare.check(row)]])[0][0].logprob) > 1e-2  # the served score is the prefixed one
    finally:
        proc.terminate()
        proc.wait(timeout=60)
