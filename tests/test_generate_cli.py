"""``glmkit generate`` end to end on a tiny saved model: continuation, blank filling, streaming, JSON, several
prompts, several sequences, the context limit (error or --truncate) and impossible settings (exit 2)."""

import json

import pytest

from glmkit.bundled import load_model_and_tokenizer
from glmkit.cli import main
from glmkit.generate import GenerationConfig
from glmkit.generate.cli import configure, generate_text, generation_kwargs
from tests.helpers.text_model import save_text_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_text_model(tmp_path_factory.mktemp("model")))


def run_json(capsys, *argv):
    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plain_text_is_continued_and_blanks_are_all_filled(model_dir, capsys):
    doc = run_json(capsys, "the king said unto", "--model", model_dir, "--max-new-tokens", "5")
    (r,) = doc["results"]
    assert r["text"].startswith("the king said unto ") and len(r["tokens"]) == 1 and r["prompt_tokens"] == 6
    assert r["new_tokens"] == 5 and r["finish_reasons"] == ["length"] and r["tokens_per_s"] > 0
    assert all(9 <= t < 27 for t in r["tokens"][0])  # words only: the padded vocabulary rows are never emitted
    doc = run_json(capsys, "the [MASK] said [sMASK] them", "--model", model_dir, "--max-new-tokens", "3")
    (r,) = doc["results"]
    assert len(r["spans"]) == 2 and "MASK" not in r["text"] and r["text"].startswith("the ")
    assert r["text"] == " ".join(["the", r["spans"][0], "said", r["spans"][1], "them"])


def test_stream_prints_what_generate_returns(model_dir, capsys):
    kw = ["--model", model_dir, "--max-new-tokens", "6", "--do-sample", "--seed", "4"]
    assert main(["generate", "the king said", *kw]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", "the king said", *kw, "--stream"]) == 0
    assert capsys.readouterr().out == plain
    assert main(["generate", "the [MASK] said", *kw, "--stream"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"the {lines[0].strip()} said"  # the span as it streamed, then the filled text


def test_file_of_prompts_and_several_sequences(model_dir, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the king\n\nwhat the lord hath\n")
    doc = run_json(capsys, "--file", str(prompts), "--model", model_dir, "--max-new-tokens", "2")
    assert [r["prompt"] for r in doc["results"]] == ["the king", "what the lord hath"]
    kw = ["--model", model_dir, "--max-new-tokens", "3", "--num-beams", "3", "--num-return-sequences", "2"]
    doc = run_json(capsys, "go and see", *kw, "--length-penalty", "0.5", "--early-stopping", "never")
    assert len(doc["results"]) == 2 and doc["settings"]["early_stopping"] == "never"


def test_context_limit_error_or_left_truncation(model_dir, capsys):
    long = " ".join(["the king said unto them"] * 8)  # 40 words; the model has 33 positions
    assert main(["generate", long, "--model", model_dir]) == 2
    assert "--truncate" in capsys.readouterr().err
    (r,) = run_json(capsys, long, "--model", model_dir, "--truncate", "--max-new-tokens", "2")["results"]
    assert r["prompt_tokens"] == 33 and r["truncated_tokens"] == 42 - 33


@pytest.mark.parametrize(
    "flags, name",
    [
        (["--top-p", "1.5"], "top_p"),
        (["--num-beams", "2", "--num-return-sequences", "3"], "num_return_sequences"),
        (["--temperature", "0", "--do-sample"], "temperature"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--stream", "--json"], "--stream"),
        (["--stop", "x"], None),  # valid: a stop string that never occurs
    ],
)
def test_impossible_settings_exit_2_naming_the_parameter(model_dir, capsys, flags, name):
    code = main(["generate", "the king", "--model", model_dir, "--max-new-tokens", "2", *flags])
    err = capsys.readouterr().err
    assert (code, name is None or name in err) == (2 if name else 0, True)


def test_every_flag_maps_to_a_generation_setting(model_dir):
    import argparse

    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(
        ["x", "--max-new-tokens", "4", "--min-new-tokens", "1", "--num-beams", "2", "--do-sample", "--top-k", "5"]
        + ["--top-p", "0.9", "--min-p", "0.05", "--typical-p", "0.95", "--temperature", "0.8", "--seed", "1"]
        + ["--repetition-penalty", "1.2", "--no-repeat-ngram-size", "2", "--length-penalty", "0.5"]
        + ["--early-stopping", "true", "--num-return-sequences", "2", "--stop", "a", "--stop", "b", "--compile"]
    )
    kw = generation_kwargs(args)
    assert kw["stop_strings"] == ["a", "b"] and kw["early_stopping"] is True and len(kw) == 17
    GenerationConfig(**kw)
    model, tok = load_model_and_tokenizer(model_dir)
    out = generate_text(model, tok, "the king", max_new_tokens=3, num_beams=2)
    assert out[0].first_token_s is None and len(out[0].tokens[0]) == 3
