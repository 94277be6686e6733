"""Commands that write a checkpoint folder refuse one that holds files unless ``--overwrite``, then replace it whole;
model, config and tokenizer appear together in one rename, and a failure or an interrupt mid-write leaves neither a
temporary folder nor a half-written target."""

import json
import shutil
from pathlib import Path

import pytest

from glmkit import GLM
from glmkit.checkpoint import OutputFolderError, read_quantization, staged_folder
from glmkit.cli import main
from tests.helpers.text_model import save_text_model


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return save_text_model(tmp_path_factory.mktemp("src") / "model")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def hidden(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.fixture
def old_checkpoint(src, tmp_path) -> Path:
    """A folder that holds another run's checkpoint, training state included."""
    out = tmp_path / "out"
    shutil.copytree(src, out)
    (out / "training_state.pt").write_bytes(b"an old run's optimizer state")
    (out / "logs").mkdir()
    (out / "logs" / "old.txt").write_text("old")
    return out


def test_quantize_refuses_a_folder_with_files(src, old_checkpoint, capsys):
    before = snapshot(old_checkpoint)
    assert main(["quantize", str(src), str(old_checkpoint), "--bits", "8"]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err and "training_state.pt" in err
    assert snapshot(old_checkpoint) == before and hidden(old_checkpoint.parent) == []


def test_quantize_into_an_empty_folder_needs_no_flag(src, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["quantize", str(src), str(tmp_path / "empty"), "--bits", "8"]) == 0
    assert read_quantization(tmp_path / "empty").bits == 8


def test_quantize_overwrite_replaces_the_folder_whole(src, old_checkpoint):
    assert main(["quantize", str(src), str(old_checkpoint), "--bits", "4", "--overwrite"]) == 0
    names = {f.name for f in old_checkpoint.iterdir()}
    assert names == {"config.json", "model.safetensors", "whitespace_vocab.json"}  # nothing of the old run is left
    assert read_quantization(old_checkpoint).bits == 4
    assert json.loads((old_checkpoint / "whitespace_vocab.json").read_text()) == json.loads(
        (src / "whitespace_vocab.json").read_text()
    )
    GLM.from_pretrained(old_checkpoint)
    assert hidden(old_checkpoint.parent) == []


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(
    ("target", "error", "code"),
    [
        ("glmkit.checkpoint.save_file", OSError("No space left on device"), 2),  # the weights
        ("glmkit.quantize.convert.shutil.copy2", OSError("No space left on device"), 2),  # the tokenizer
        ("glmkit.quantize.convert.shutil.copy2", KeyboardInterrupt(), 130),  # Ctrl-C after the weights
    ],
)
def test_failure_mid_write_leaves_no_trace(src, old_checkpoint, monkeypatch, capsys, overwrite, target, error, code):
    out = old_checkpoint if overwrite else old_checkpoint.parent / "fresh"
    before = snapshot(out) if overwrite else None

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(target, fail)
    assert main(["quantize", str(src), str(out), "--bits", "8", *(["--overwrite"] if overwrite else [])]) == code
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert hidden(out.parent) == []  # no temporary folder left behind
    if overwrite:
        assert snapshot(out) == before  # the old checkpoint as it was, not half replaced
    else:
        assert not out.exists()


def test_staged_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file"), staged_folder(tmp_path / "file"):
        pass
    dest = tmp_path / "dest"
    with staged_folder(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".dest.") and not dest.exists()
        (tmp / "a").write_text("1")
    assert snapshot(dest) == {"a": b"1"}
    with pytest.raises(OutputFolderError, match="holds a"), staged_folder(dest):
        pass
    with staged_folder(dest, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert snapshot(dest) == {"b": b"2"}
    with pytest.raises(KeyboardInterrupt), staged_folder(dest, overwrite=True) as tmp:
        (tmp / "c").write_text("3")
        raise KeyboardInterrupt
    assert snapshot(dest) == {"b": b"2"} and hidden(tmp_path) == []
