"""Every expected failure of a command is one line ``glmkit CMD: error: ...`` naming the file and the problem, with
exit code 2 and no traceback: broken checkpoints (truncated, corrupted, pickles with a payload), bad JSON and YAML,
wrong kinds of paths. ``--debug`` shows the traceback; an unexpected exception (a bug) keeps it."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from glmkit.bundled import BUNDLED_MODEL
from glmkit.checkpoint import CheckpointError
from glmkit.cli import main
from tests.helpers.text_model import save_text_model

GENERATE = ["--max-new-tokens", "1"]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return save_text_model(tmp_path_factory.mktemp("good") / "model")


def expect_error(capsys, argv: list[str], *needles: str) -> str:
    """Run ``glmkit ARGV``; it must fail with exit code 2 and one stderr line holding every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"glmkit {argv[0]}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


class Payload:
    """Unpickling this runs a shell command: a loader that executes it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _truncate(folder: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _corrupt_header(folder: Path) -> None:
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"#" * 12  # the JSON header starts at byte 8
    f.write_bytes(bytes(data))


def _torch_pickle_with_payload(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    torch.save({"glm.word_embeddings.weight": Payload(folder / "PWNED")}, folder / "pytorch_model.bin")


def _plain_pickle_with_payload(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(folder / "PWNED")))


def _truncated_torch_file(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    torch.save({"glm.word_embeddings.weight": torch.zeros(64, 32)}, folder / "pytorch_model.bin")
    f = folder / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:300])


def _config(text: str):
    return lambda folder: (folder / "config.json").write_text(text)


def _config_field(**fields):
    def patch(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | fields))

    return patch


def _index(text: str):
    def patch(folder: Path) -> None:
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text(text)

    return patch


def _vocab(text: str):
    return lambda folder: (folder / "whitespace_vocab.json").write_text(text)


@pytest.mark.parametrize(
    ("breaker", "needles"),
    [
        (_truncate, ["model.safetensors", "truncated or corrupted"]),
        (_corrupt_header, ["model.safetensors", "invalid JSON in header"]),
        (lambda f: (f / "model.safetensors").write_bytes(b""), ["model.safetensors", "header too small"]),
        (_torch_pickle_with_payload, ["pytorch_model.bin", "refused", "posix.system"]),
        (_plain_pickle_with_payload, ["pytorch_model.bin", "refused"]),
        (_truncated_torch_file, ["pytorch_model.bin", "not a readable PyTorch checkpoint"]),
        (_config("[1, 2, 3]"), ["config.json", "expected a JSON object", "found an array"]),
        (_config('"glm"'), ["config.json", "expected a JSON object", "found a string"]),
        (_config('{"num_layers": 2,'), ["config.json", "not valid JSON"]),
        (_config_field(num_attention_heads=5), ["config.json", "n_head", "do not divide"]),
        (_config_field(glmkit_special_tokens=[1, 2]), ["config.json", "special_tokens", "found an array"]),
        (_config_field(glmkit_gelu=["tanh"]), ["config.json", "gelu"]),
        (_index("[]"), ["model.safetensors.index.json", "found an array"]),
        (_index('{"weight_map": 3}'), ["model.safetensors.index.json", "not a shard index"]),
        (_vocab("[1]"), ["whitespace_vocab.json", "found an array"]),
        (_vocab('{"words": 5}'), ["whitespace_vocab.json", "list of the vocabulary's words"]),
    ],
)
def test_broken_checkpoint_is_one_line(good, tmp_path, capsys, breaker, needles):
    folder = tmp_path / "model"
    shutil.copytree(good, folder)
    breaker(folder)
    line = expect_error(capsys, ["generate", "the king", "--model", str(folder), *GENERATE], *needles)
    assert str(folder) in line
    assert not (folder / "PWNED").exists()  # the payload never ran


def test_broken_bpe_tokenizer_files_are_one_line(tmp_path, capsys):
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json"):
        shutil.copy(BUNDLED_MODEL / name, folder / name)
    (folder / "tokenizer.json").write_text('{"model": ')
    expect_error(capsys, ["explain", "a [MASK] b", "--tokenizer", str(folder)], str(folder), "tokenizer files")
    (folder / "tokenizer.json").write_text((BUNDLED_MODEL / "tokenizer.json").read_text())
    (folder / "tokenizer_config.json").write_text("[1, 2]")
    expect_error(capsys, ["explain", "a [MASK] b", "--tokenizer", str(folder)], "tokenizer_config.json", "array")
    expect_error(capsys, ["explain", "a [MASK] b", "--tokenizer", str(folder / "tokenizer.json")], "is a file")


def test_wrong_kinds_of_paths(good, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00bad")
    model = ["--model", str(good), *GENERATE]
    expect_error(capsys, ["generate", "--file", str(tmp_path), *model], "--file", str(tmp_path), "is a folder")
    expect_error(capsys, ["generate", "--file", str(tmp_path / "nope"), *model], "does not exist")
    expect_error(capsys, ["generate", "--file", str(tmp_path / "binary"), *model], "binary", "not UTF-8")
    expect_error(capsys, ["compare-decoding", "--prompts", str(tmp_path), *model[:2]], "--prompts", "is a folder")
    expect_error(capsys, ["generate", "the king", "--model", str(tmp_path / "nope")], "nope", "does not exist")
    expect_error(capsys, ["quantize", str(good), str(tmp_path / "file"), "--bits", "8"], "file", "is a file")
    expect_error(capsys, ["quantize", str(tmp_path / "file"), str(tmp_path / "q"), "--bits", "8"], "IN:", "is a file")
    expect_error(capsys, ["quantize", str(good), str(good.parent), "--bits", "8"], "holds the input folder")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("data: [unclosed\n", ["not valid YAML", "line 2"]),
        ("data: x\n\ttrain: {}\n", ["not valid YAML", "line 2"]),
        ("- a list\n", ["expected a mapping of sections", "found a list"]),
        ("data: 3\ntokenizer: t\n", ["'data' must be a folder path", "3"]),
        ("data: d\ntokenizer: t\ntrain: 5\n", ["train: expected a mapping, got int"]),
    ],
)
def test_bad_pretrain_yaml_is_one_line(tmp_path, capsys, text, needles):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    expect_error(capsys, ["pretrain", "--config", str(path)], str(path), *needles)


def test_bad_pretrain_override_is_one_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": "d", "tokenizer": "t", "train": 5}))
    expect_error(capsys, ["pretrain", "--config", str(path), "--set", "train.lr=1"], "single value, not a mapping")
    path.write_text(yaml.safe_dump({"data": "d", "tokenizer": "t"}))
    expect_error(capsys, ["pretrain", "--config", str(path), "--set", "train.lr=[1"], "train.lr=[1", "not valid YAML")


def test_debug_shows_the_traceback(good, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(good, folder)
    _truncate(folder)
    for argv in (
        ["--debug", "generate", "x", "--model", str(folder)],
        ["generate", "x", "--model", str(folder), "--debug"],
    ):
        with pytest.raises(CheckpointError, match="truncated or corrupted"):
            main(argv)


def test_a_bug_keeps_its_traceback(monkeypatch):
    import glmkit.explain

    def buggy(args):
        raise KeyError("a bug")

    monkeypatch.setattr(glmkit.explain, "run", buggy)
    with pytest.raises(KeyError, match="a bug"):
        main(["explain", "a [MASK] b"])


def test_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    import glmkit.explain

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(glmkit.explain, "run", interrupted)
    assert main(["explain", "a [MASK] b"]) == 130
    assert capsys.readouterr().err == "glmkit explain: interrupted\n"


def test_real_process_prints_one_line_and_exits_2(good, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(good, folder)
    _torch_pickle_with_payload(folder)
    proc = subprocess.run(
        [sys.executable, "-m", "glmkit", "generate", "the king", "--model", str(folder), *GENERATE],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("glmkit generate: error: "), proc.stderr
    assert "refused" in lines[0] and "Traceback" not in proc.stderr
    assert not (folder / "PWNED").exists()
