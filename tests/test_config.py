import json

import pytest

from glmkit import GLMConfig, SpecialTokens
from glmkit.config import ConfigError

from .conftest import FIXTURES


def test_reads_hub_config_and_round_trips(tmp_path):
    cfg = GLMConfig.from_file(FIXTURES / "glm" / "config.json")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.max_sequence_length) == (2, 64, 4, 640, 64)
    assert cfg.gelu == "tanh" and cfg.special_tokens is None and cfg.n_positions == 65
    cfg.special_tokens = SpecialTokens(eos=579, pad=579, sop=580, eop=581, cls=582, mask=583)
    cfg.save(tmp_path / "config.json")
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["num_layers"] == 2 and d["hidden_size"] == 64 and d["block_position_encoding"] is True
    assert GLMConfig.from_file(tmp_path) == cfg


def test_hub_hidden_act_selects_gelu():
    d = json.loads((FIXTURES / "glm" / "config.json").read_text())
    assert GLMConfig.from_hub_dict({**d, "hidden_act": "gelu"}).gelu == "erf"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"num_layerz": 3}, "num_layerz"),
        ({"num_attention_heads": 5}, "n_head"),
        ({"hidden_size": -4}, "n_embd"),
        ({"attention_dropout_prob": 1.5}, "attention_dropout"),
        ({"relative_encoding": True}, "relative_encoding"),
        ({"model_type": "chatglm"}, "model_type"),
        ({"glmkit_gelu": "relu"}, "gelu"),
        ({"glmkit_special_tokens": {"eos": 1, "pad": 1, "cls": 2, "mask": 3, "sop": 4, "eop": 9999}}, "eop"),
    ],
)
def test_bad_values_name_the_field(patch, field):
    d = json.loads((FIXTURES / "glm" / "config.json").read_text())
    with pytest.raises(ConfigError, match=field):
        GLMConfig.from_hub_dict({**d, **patch})


def test_missing_required_field():
    d = json.loads((FIXTURES / "glm" / "config.json").read_text())
    del d["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size"):
        GLMConfig.from_hub_dict(d)


@pytest.mark.parametrize(
    ("shape", "params"),
    [
        ((24, 1024, 16, 30592, 512), 334_688_256),  # GLM-Large (docs/glm-notes.md, TV9)
        ((48, 4096, 64, 50304, 1024), 9_880_682_496),  # GLM-10B
        ((24, 1024, 16, 50048, 1024), 355_659_776),  # GLM-Large-Chinese
        ((12, 768, 12, 30592, 512), 109_338_624),  # GLM-Base
    ],
)
def test_parameter_counts_of_released_models(shape, params):
    import torch

    from glmkit import GLM

    n_layer, n_embd, n_head, vocab, max_seq = shape
    cfg = GLMConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, max_sequence_length=max_seq)
    assert cfg.num_parameters() == params
    with torch.device("meta"):
        model = GLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == params
