"""``position_encoding="rotary_2d_interleaved"`` (glmkit's 2D RoPE, rotary.py): the rotation it is defined as, no
position tables, attention that depends on relative positions only, the name it had before (``rotary_2d``) still
loading, and everything that runs a GLM — cached decoding, batching, save/load, training — computes the same
function with it."""

import json
import shutil

import pytest
import torch

from glmkit import GLM, GLMConfig, KVCache
from glmkit.config import ConfigError
from glmkit.generate import generate
from glmkit.generate.engine import GLMStepper, prefill
from glmkit.generate.fast import cache_dtype
from glmkit.rotary import angles_2d, apply_interleaved
from glmkit.train.loop import blank_infill_loss
from tests.helpers.generation import SPECIAL, EopAfter

ROWS = [[582, 5, 6, 7, 8, 583, 9, 579], [582, 40, 41, 586]]


def rotary_model(**kw) -> GLM:
    torch.manual_seed(0)
    cfg = GLMConfig(
        n_layer=2, n_embd=64, n_head=4, max_sequence_length=64, position_encoding="rotary_2d_interleaved", **kw
    )
    model = GLM(cfg).eval()
    with torch.no_grad():  # larger than the init so that attention is far from uniform and positions matter
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8)
    return model


def test_config_round_trip_and_validation(tmp_path):
    cfg = GLMConfig(n_embd=64, n_head=4, position_encoding="rotary_2d_interleaved")
    assert GLMConfig.from_hub_dict(cfg.to_hub_dict()) == cfg
    assert "glmkit_position_encoding" not in GLMConfig().to_hub_dict()  # released configs stay as they were
    with pytest.raises(ConfigError, match="position_encoding"):
        GLMConfig(position_encoding="alibi")
    with pytest.raises(ConfigError, match="divisible by 4"):
        GLMConfig(n_embd=24, n_head=4, position_encoding="rotary_2d_interleaved")
    model = rotary_model()
    assert model.wpe is None and model.wbpe is None
    assert sum(p.numel() for p in model.parameters()) == model.config.num_parameters()
    model.save_pretrained(tmp_path)
    loaded = GLM.from_pretrained(tmp_path).eval()
    ids, pos = torch.tensor([ROWS[0]]), torch.tensor([[list(range(8)), [0] * 8]])
    torch.testing.assert_close(loaded(ids, pos, 8), model(ids, pos, 8), atol=0, rtol=0)


def test_the_rotation_turns_adjacent_pairs_by_position_then_block_position():
    """Pair ``i`` of a head, as the complex number ``x[2i] + j x[2i + 1]``, is multiplied by ``exp(j angle_i)``: angles
    ``pos * f_i`` on the first half of the head, ``block * f_i`` on the second, ``f_i = 10000^(-i / quarter)``."""
    head, quarter = 16, 4
    pos = torch.tensor([[[0, 3, 7], [0, 0, 2]]])  # [B=1, 2, S=3]
    x = torch.randn(1, 2, 3, head)
    f = 10000.0 ** (-torch.arange(quarter) / quarter)
    angle = torch.cat((pos[0, 0, :, None] * f, pos[0, 1, :, None] * f), dim=-1)  # [S, head / 2]
    expected = torch.view_as_real(
        torch.view_as_complex(x.view(1, 2, 3, head // 2, 2)) * torch.polar(torch.ones_like(angle), angle)
    ).flatten(-2)
    torch.testing.assert_close(apply_interleaved(x, angles_2d(pos, head)), expected)


def test_the_name_before_the_rename_loads_as_the_same_encoding(tmp_path):
    """``rotary_2d`` (the bundled model's config.json, checkpoints saved before the rename) means the interleaved
    variant: the same config, and a checkpoint saved under the old name computes the same logits."""
    assert GLMConfig(n_embd=64, n_head=4, position_encoding="rotary_2d") == rotary_model().config
    from glmkit.bundled import BUNDLED_MODEL

    assert json.loads((BUNDLED_MODEL / "config.json").read_text())["glmkit_position_encoding"] == "rotary_2d"
    assert GLMConfig.from_file(BUNDLED_MODEL).position_encoding == "rotary_2d_interleaved"
    model = rotary_model()
    model.save_pretrained(tmp_path / "new")
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    assert config["glmkit_position_encoding"] == "rotary_2d_interleaved"
    config["glmkit_position_encoding"] = "rotary_2d"
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    old = GLM.from_pretrained(tmp_path / "old").eval()
    assert old.config == model.config
    ids, pos = torch.tensor([ROWS[0]]), torch.tensor([[list(range(8)), [0] * 8]])
    torch.testing.assert_close(old(ids, pos, 8), model(ids, pos, 8), atol=0, rtol=0)


def test_attention_sees_relative_positions_only():
    ids = torch.tensor([ROWS[0]])
    pos = torch.tensor([[list(range(8)), [0] * 8]])
    shifted = pos + torch.tensor([[[5], [0]]])
    for model, relative in ((rotary_model(), True), (GLM(GLMConfig(n_layer=2, n_embd=64, n_head=4)).eval(), False)):
        a, b = model(ids, pos, 8), model(ids, shifted, 8)
        assert torch.allclose(a, b, atol=1e-4) == relative
    model = rotary_model()
    assert not torch.allclose(model(ids, pos, 8), model(ids, pos.flip(-1), 8), atol=1e-3)  # order still matters


def test_cached_batched_decoding_equals_the_full_forward():
    model = rotary_model(special_tokens=SPECIAL)
    tokens = torch.randint(0, 579, (4, 2), generator=torch.Generator().manual_seed(1))

    def steps(m, rows, blanks, toks):
        cache = KVCache.for_model(m, len(rows), 16, dtype=cache_dtype(m))
        with torch.inference_mode():
            prefill(m, rows, cache)
            stepper = GLMStepper(m, cache, torch.tensor(blanks), SPECIAL.sop)
            return torch.stack([stepper.step(None)] + [stepper.step(t) for t in toks])

    fast = steps(model, ROWS, [5, 3], tokens)
    slow = steps(EopAfter(model, {}), ROWS, [5, 3], tokens)  # GLM.forward with its own masks
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    for b, row in enumerate(ROWS):
        alone = steps(model, [row], [[5, 3][b]], tokens[:, b : b + 1])
        torch.testing.assert_close(alone[:, 0], fast[:, b], atol=1e-5, rtol=0)
    batched = generate(model, ROWS, special_tokens=SPECIAL, max_new_tokens=5).new_tokens
    assert batched == [generate(model, [r], special_tokens=SPECIAL, max_new_tokens=5).new_tokens[0] for r in ROWS]


def test_trains_with_and_without_activation_checkpointing():
    ids, pos = torch.tensor([ROWS[0]]), torch.tensor([[list(range(8)), [0] * 8]])
    targets = torch.roll(ids, -1, dims=1)
    grads = []
    for ckpt in (False, True):
        model = rotary_model().train()
        model.gradient_checkpointing = ckpt
        loss = blank_infill_loss(model(ids, pos, 8), targets, torch.ones_like(ids))
        loss.backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])
