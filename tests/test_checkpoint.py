import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from glmkit import GLM, GLMConfig
from glmkit.checkpoint import CheckpointError

from .conftest import FIXTURES
from .helpers.hub import to_hub_state_dict


def _same(a: GLM, b: GLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_load_round_trip_with_hub_names(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    keys = set(load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    assert "glm.word_embeddings.weight" in keys
    assert "glm.transformer.layers.1.mlp.dense_4h_to_h.bias" in keys
    assert not any("lm_head" in k for k in keys)  # tied head is not stored twice
    _same(tiny_model, GLM.from_pretrained(tmp_path / "ckpt"))


def test_loads_pytorch_model_bin_without_prefix(tiny_model, tmp_path):
    tiny_model.config.save(tmp_path / "config.json")
    state = {k.removeprefix("glm."): v for k, v in to_hub_state_dict(tiny_model).items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    _same(tiny_model, GLM.from_pretrained(tmp_path))


def test_loads_sharded_safetensors(tiny_model, tmp_path):
    tiny_model.config.save(tmp_path / "config.json")
    state = to_hub_state_dict(tiny_model)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: state[k].contiguous() for k in ks}, str(tmp_path / name))
        weight_map.update({k: name for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _same(tiny_model, GLM.from_pretrained(tmp_path))


def test_loads_megatron_checkpoint(tiny_model, tmp_path):
    state = {k.removeprefix("glm."): v for k, v in to_hub_state_dict(tiny_model).items()}
    (tmp_path / "release").mkdir()
    torch.save({"module": state, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "release/mp_rank_00_model_states.pt")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release\n")
    with pytest.raises(CheckpointError, match="no config.json"):
        GLM.from_pretrained(tmp_path)
    _same(tiny_model, GLM.from_pretrained(tmp_path, config=tiny_model.config))


def test_loading_refuses_arbitrary_pickles(tiny_model, tmp_path):
    tiny_model.config.save(tmp_path / "config.json")
    torch.save({"module": {"x": object()}}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"refused to load: .*\(Unsupported global: GLOBAL object was not"):
        GLM.from_pretrained(tmp_path)


def test_reference_fixture_loads_on_meta_lazily():
    model = GLM.from_pretrained(FIXTURES / "glm", dtype=torch.bfloat16)
    assert all(not p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("mutation", ["missing", "unexpected", "shape"])
def test_bad_tensors_are_named(tiny_model, tmp_path, mutation):
    tiny_model.config.save(tmp_path / "config.json")
    state = to_hub_state_dict(tiny_model)
    key = "glm.transformer.layers.0.attention.query_key_value.weight"
    if mutation == "missing":
        del state[key]
        match = key.removeprefix("glm.")
    elif mutation == "unexpected":
        state["glm.transformer.layers.9.attention.dense.weight"] = torch.zeros(2)
        match = "layers.9"
    else:
        state[key] = torch.zeros(95, 32)
        match = r"query_key_value.weight: checkpoint shape \(95, 32\) does not match the config's \(96, 32\)"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=match):
        GLM.from_pretrained(tmp_path)


def test_folder_without_config_or_weights(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        GLM.from_pretrained(tmp_path)
    GLMConfig().save(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no weights found"):
        GLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GLM.from_pretrained(tmp_path / "nope")


def test_save_is_atomic_and_keeps_other_files(tiny_model, tmp_path, monkeypatch):
    dest = tmp_path / "ckpt"
    tiny_model.save_pretrained(dest)
    (dest / "tokenizer.json").write_text("{}")
    before = (dest / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("glmkit.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        GLM(tiny_model.config).save_pretrained(dest)
    assert (dest / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written temp folder left
    monkeypatch.undo()
    GLM(tiny_model.config).save_pretrained(dest)
    assert (dest / "tokenizer.json").exists() and (dest / "model.safetensors").read_bytes() != before
