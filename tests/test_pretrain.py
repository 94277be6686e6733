"""End to end on a small corpus: train-tokenizer -> prepare-data -> pretrain (config file) -> resume -> load."""

import random

import pytest
import yaml

from glmkit import GLM
from glmkit.cli import main
from glmkit.config import ConfigError
from glmkit.train.pretrain import load_config, pretrain

WORDS = "the king said unto them go and see what the lord hath done in the land of egypt for ever".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = []
    for _ in range(40):
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
            for _ in range(rng.randint(4, 9))
        ]
        docs.append(" ".join(sentences))
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    assert main(["train-tokenizer", str(root / "corpus.txt"), "--out", str(root / "tok"), "--vocab-size", "300"]) == 0
    assert (
        main(
            [
                "prepare-data",
                str(root / "corpus.txt"),
                "--tokenizer",
                str(root / "tok"),
                "--out",
                str(root / "shards"),
                "--val-fraction",
                "0.1",
            ]
        )
        == 0
    )
    return root


def _write_config(root, out, **train):
    cfg = {
        "data": str(root / "shards"),
        "tokenizer": str(root / "tok"),
        "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 320, "max_sequence_length": 64},
        "blank": {"seq_length": 64, "bert_prob": 0.4, "gap_sentence_prob": 0.3, "seed": 3},
        "train": {
            "out_dir": str(out),
            "max_steps": 4,
            "micro_batch_size": 4,
            "lr": 1e-3,
            "eval_every": 2,
            "eval_batches": 2,
            "save_every": 2,
            "progress": False,
            **train,
        },
    }
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pretrain_end_to_end_and_resume(corpus, tmp_path):
    path = _write_config(corpus, tmp_path / "run")
    full = pretrain(load_config(path, ["train.out_dir=" + str(tmp_path / "full")]))
    half = pretrain(load_config(path, ["train.max_steps=2", "train.decay_iters=4"]))
    rest = pretrain(load_config(path, ["train.decay_iters=4"]))
    assert len(full.losses) == 4 and half.losses + rest.losses == pytest.approx(full.losses, abs=0)
    evals = {k for e in full.evals for k in e if k != "step"}
    assert evals == {"bert", "sentence", "gpt"}  # held-out loss per objective
    model = GLM.from_pretrained(tmp_path / "run" / "final")
    assert model.config.special_tokens is not None and (tmp_path / "run" / "final" / "tokenizer.json").exists()


def test_cli_and_config_errors(corpus, tmp_path):
    path = _write_config(corpus, tmp_path / "cli", max_steps=1)
    assert main(["pretrain", "--config", str(path)]) == 0
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path, ["train.learning_rate=1"])
    with pytest.raises(ConfigError, match="mask_ratio"):
        load_config(path, ["blank.mask_ratio=1.5"])
    with pytest.raises(ConfigError, match="position table"):
        load_config(path, ["blank.seq_length=128"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["glm-base", "glm-large", "glm-10b", "glmkit-small"])
def test_shipped_configs_validate(name):
    from pathlib import Path

    from glmkit import GLM

    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert cfg.train.lr > 0 and cfg.blank.seq_length <= cfg.model.max_sequence_length
    expected = {"glm-base": 109_338_624, "glm-large": 334_688_256, "glm-10b": 9_880_682_496}
    if name in expected:
        assert cfg.model.num_parameters() == expected[name]
    import torch

    with torch.device("meta"):
        GLM(cfg.model)


def test_out_dir_is_refused_or_replaced_and_final_written_whole(corpus, tmp_path, monkeypatch, capsys):
    from glmkit.tokenizer import WhitespaceTokenizer, load_tokenizer

    out = tmp_path / "run"
    path = _write_config(corpus, out, max_steps=1)
    assert main(["pretrain", "--config", str(path)]) == 0
    final = (out / "final" / "model.safetensors").read_bytes()
    (out / "stale.txt").write_text("from an older run")
    assert main(["pretrain", "--config", str(path), "--no-resume"]) == 2
    assert "is not empty" in capsys.readouterr().err and (out / "stale.txt").exists()

    def failing_save(self, folder):
        raise OSError("No space left on device")

    tok_class = type(load_tokenizer(corpus / "tok"))
    assert tok_class is not WhitespaceTokenizer
    monkeypatch.setattr(tok_class, "save_pretrained", failing_save)
    assert main(["pretrain", "--config", str(path), "--overwrite"]) == 2  # the tokenizer fails to be written
    assert not (out / "final").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert main(["pretrain", "--config", str(path), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()  # the old run is gone whole
    names = {f.name for f in (out / "final").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names and "training_state.pt" not in names
    assert (out / "final" / "model.safetensors").read_bytes() == final  # same config, same seed: same weights


def test_overwrite_never_deletes_the_run_inputs(corpus, tmp_path, capsys):
    path = _write_config(corpus, corpus, max_steps=1)  # out_dir is the folder holding the data and tokenizer
    assert main(["pretrain", "--config", str(path), "--overwrite"]) == 2
    assert "would delete it" in capsys.readouterr().err
    assert (corpus / "shards").is_dir() and (corpus / "tok").is_dir()
