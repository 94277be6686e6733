"""P-tuning v2 prefixes on ChatGLM-6B (THUDM/chatglm-6b with ``pre_seq_len``): the prefix's keys/values laid out as
the hub's ``get_prompt`` views them, seen by every query, positions unshifted; generation through the KV cache equals
a full recompute; the released P-tuning layout loads and round-trips; bad input is named; training moves only it."""

import json

import pytest
import torch
from safetensors.torch import load_file

from glmkit import GLM, KVCache
from glmkit.chatglm.v1 import ChatGLM6B, ChatGLM6BConfig
from glmkit.checkpoint import CheckpointError
from glmkit.config import ConfigError
from glmkit.finetune import FinetuneArgs, Seq2SeqTask, finetune
from glmkit.finetune.peft import PrefixTunedChatGLM6B, add_prefix, count_parameters, load_prefix, save_prefix
from glmkit.generate import generate
from glmkit.masks import chatglm6b_inputs
from glmkit.tokenizer import WhitespaceTokenizer
from glmkit.train.loop import TrainArgs

from .conftest import FIXTURES

FX = FIXTURES / "chatglm6b"
HUB = json.loads((FX / "config.json").read_text())
SOP, GMASK, PAD = HUB["bos_token_id"], HUB["gmask_token_id"], HUB["pad_token_id"]


def _fixture_model():
    return GLM.from_pretrained(FX, dtype=torch.float32).eval()


def _wide(seed=0, std=0.3):
    """A random model with wide weights: varied greedy tokens."""
    torch.manual_seed(seed)
    model = ChatGLM6B(ChatGLM6BConfig.from_hub_dict(HUB))
    model.reset_parameters(std)
    return model.eval()


def _hub_prompt(model: ChatGLM6B, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """THUDM/chatglm-6b ``ChatGLMModel.get_prompt``, written out: the embedding of every prefix token, viewed
    ``[batch, pre_seq_len, n_layer * 2, heads, head_size]``, permuted to ``[n_layer * 2, pre_seq_len, batch, heads,
    head_size]`` and split in (k, v) pairs per layer, each ``[seq, batch, heads, head_size]``."""
    c, emb = model.model.config, model.prefix_encoder.embedding.weight.detach()
    P = emb.shape[0]
    kv = emb[None].expand(batch, -1, -1).reshape(batch, P, c.n_layer * 2, c.n_head, c.head_size)
    return [(pair[0], pair[1]) for pair in kv.permute(2, 1, 0, 3, 4).split(2)]


def _hub_reference(tuned: PrefixTunedChatGLM6B, ids, positions, hub_mask):
    """The base model with the hub's prefix keys/values already in its cache (unrotated, in front) and the hub's
    mask widened by ``pre_seq_len`` unmasked columns: what the hub's attention computes with ``pre_seq_len`` set."""
    base, B = tuned.model, ids.shape[0]
    prompt = _hub_prompt(tuned, B)
    P = prompt[0][0].shape[0]
    cache = KVCache.for_model(base, B, P + ids.shape[1])
    for layer, (k, v) in enumerate(prompt):
        cache.k[layer, :, :, :P] = k.permute(1, 2, 0, 3)  # [seq, batch, heads, dim] -> [batch, heads, seq, dim]
        cache.v[layer, :, :, :P] = v.permute(1, 2, 0, 3)
    cache.set_lengths([P] * B)
    hub_mask = torch.cat([torch.zeros(*hub_mask.shape[:3], P, dtype=torch.bool), hub_mask], dim=-1)
    return base(ids, positions, hub_mask, cache=cache)


# ---- (1) the hub's math ----------------------------------------------------------------------------------------


def test_prefixed_logits_equal_the_hub_prefix_in_front_of_every_layer():
    tuned = add_prefix(_fixture_model(), 3)
    assert isinstance(tuned, PrefixTunedChatGLM6B)
    ids = torch.tensor([[5, 6, 7, 8, GMASK, SOP, 9, 10], [PAD, PAD, 11, 12, GMASK, SOP, 13, 14]])
    positions, visible = chatglm6b_inputs(ids, sop_id=SOP, mask_id=HUB["mask_token_id"], gmask_id=GMASK)
    hub_mask = ~visible.expand(2, 1, 8, 8).clone()
    hub_mask[1, :, :, :2] = True  # the hub tokenizer's left padding: masked as keys and as queries
    hub_mask[1, :, :2, :] = True
    positions[1, 0] = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2])  # its positions count the real tokens only
    with torch.no_grad():
        want = _hub_reference(tuned, ids, positions, hub_mask)
        got = tuned(ids, positions, ~hub_mask)  # glmkit's convention: True = may attend
        derived = tuned(ids[:1])  # the hub's get_position_ids / get_masks of the ids, positions unshifted
        base = tuned.model(ids[:1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(derived, want[:1], rtol=1e-5, atol=1e-5)
    assert (derived - base).abs().max() > 1e-2  # the prefix is in effect
    # a padding query row sees the prefix only (the hub's -10000 fill), not the mean over every key
    assert torch.isfinite(got[1, :2]).all()


# ---- (2) cached == uncached ------------------------------------------------------------------------------------


def test_greedy_generation_with_the_prefix_through_the_cache_equals_a_full_recompute():
    tuned = add_prefix(_wide(), 4)
    with torch.no_grad():
        tuned.prefix_encoder.embedding.weight.mul_(0.5)
    prompts = [[5, 6, 7, 8, 9, GMASK], [20, 21, GMASK]]
    outs = generate(tuned, prompts, max_new_tokens=8, kernels=False, eos_token_id=319)
    alone = [generate(tuned, [p], max_new_tokens=8, kernels=False, eos_token_id=319).new_tokens[0] for p in prompts]
    assert outs.new_tokens == alone  # ragged rows in one cache
    base = generate(_wide(), prompts[:1], max_new_tokens=8, kernels=False, eos_token_id=319).new_tokens[0]
    assert base != alone[0]
    for prompt, new in zip(prompts, alone, strict=True):
        assert len(set(new)) > 2  # varied tokens: the comparison below has something to check
        # uncached: the prompt, <sop> and every generated token but the last in one pass (the hub's layout)
        ids = torch.tensor([prompt + [SOP] + new[:-1]])
        with torch.no_grad():
            logits = tuned(ids)[0, len(prompt) :]
        assert logits.argmax(-1).tolist() == new
        # the forward's own cache path: prefill the prompt, then the rest in one step with explicit positions
        positions, visible = chatglm6b_inputs(ids, sop_id=SOP, mask_id=HUB["mask_token_id"], gmask_id=GMASK)
        cache, n = KVCache.for_model(tuned, 1, 32), len(prompt)
        with torch.no_grad():
            tuned(ids[:, :n], positions[..., :n], visible[..., :n, :n], cache)
            step = tuned(ids[:, n:], positions[..., n:], None, cache)
        torch.testing.assert_close(step[0], logits, rtol=1e-5, atol=1e-5)


# ---- (3) the released layout -----------------------------------------------------------------------------------


def test_a_released_ptuning_checkpoint_loads_and_save_load_round_trips(tmp_path):
    tuned = add_prefix(_fixture_model(), 5)
    P, width = 5, HUB["num_layers"] * 2 * HUB["hidden_size"]
    assert tuned.prefix_encoder.embedding.weight.shape == (P, width)
    assert count_parameters(tuned).trainable == P * width
    # THUDM/ChatGLM-6B ptuning/: the trainer saves the prefix only, beside the run's full config.json
    released = torch.randn(P, width).half()
    folder = tmp_path / "checkpoint-3000"
    folder.mkdir()
    torch.save({"transformer.prefix_encoder.embedding.weight": released}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({**HUB, "pre_seq_len": P, "prefix_projection": False}))
    loaded = load_prefix(_fixture_model(), folder)
    assert isinstance(loaded, PrefixTunedChatGLM6B) and loaded.pre_seq_len == P
    assert torch.equal(loaded.prefix_encoder.embedding.weight, released.float())
    ids = torch.tensor([[5, 6, 7, GMASK, SOP, 9]])
    with torch.no_grad():
        out, base = loaded(ids), loaded.model(ids)
        tuned.prefix_encoder.embedding.weight.copy_(released.float())
        torch.testing.assert_close(out, _hub_reference(tuned, ids, *_hub_inputs(ids)), rtol=1e-5, atol=1e-5)
    assert (out - base).abs().max() > 1e-2
    # save_prefix -> load_prefix, the two-layer MLP too
    for projection in (False, True):
        model = add_prefix(_fixture_model(), 4, projection=projection)
        save_prefix(model, tmp_path / f"p{projection}")
        keys = set(load_file(tmp_path / f"p{projection}" / "model.safetensors"))
        assert keys == {f"transformer.prefix_encoder.{k}" for k in model.prefix_encoder.state_dict()}
        again = load_prefix(_fixture_model(), tmp_path / f"p{projection}")
        assert again.prefix_encoder.config.prefix_projection is projection
        with torch.no_grad():
            assert torch.equal(again(ids), model(ids))
    # the hub loader points at load_prefix for a P-tuning config
    with pytest.raises(ConfigError, match=r"pre_seq_len: expected null \(a P-tuning v2 prefix .*peft\.load_prefix\)"):
        ChatGLM6BConfig.from_hub_dict({**HUB, "pre_seq_len": P})


def _hub_inputs(ids):
    positions, visible = chatglm6b_inputs(ids, sop_id=SOP, mask_id=HUB["mask_token_id"], gmask_id=GMASK)
    return positions, ~visible


# ---- (4) bad input ---------------------------------------------------------------------------------------------


def test_bad_prefixes_and_masks_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"a prefix of 64 tokens overflows the context of 64 \(max_sequence_length\)"):
        add_prefix(_fixture_model(), 64)
    with pytest.raises(ValueError, match="pre_seq_len: expected a positive int, got 0"):
        add_prefix(_fixture_model(), 0)
    # the prefix's room is taken from the context generation fits a prompt to
    tuned = add_prefix(_fixture_model(), 60)
    assert tuned.config.max_sequence_length == 4 and tuned.model.config.max_sequence_length == 64
    with pytest.raises(ValueError, match="input_ids"):
        generate(tuned, [[5, 6, 7, 8, 9, GMASK]], max_new_tokens=2, kernels=False)
    # a prefix made for another model: its width is named against the model's
    folder = tmp_path / "other"
    folder.mkdir()
    torch.save(
        {"transformer.prefix_encoder.embedding.weight": torch.zeros(3, 2 * 2 * 32)}, folder / "pytorch_model.bin"
    )
    with pytest.raises(CheckpointError, match=r"weight \(3, 128\) does not fit this model \(expected \(3, 256\)"):
        load_prefix(_fixture_model(), folder)
    (folder / "config.json").write_text(json.dumps({**HUB, "pre_seq_len": 8}))
    with pytest.raises(CheckpointError, match="pre_seq_len=8, the weights hold 3"):
        load_prefix(_fixture_model(), folder)
    # the hub's mask convention (True = masked) is refused rather than read inverted
    ids = torch.tensor([[5, 6, 7, GMASK, SOP, 9]])
    with pytest.raises(ValueError, match="no token of row 0 may attend to itself.*True = masked.*~mask"):
        add_prefix(_fixture_model(), 2)(ids, *_hub_inputs(ids))
    with pytest.raises(ValueError, match="position_ids: needed once the cache holds tokens"):
        cache = KVCache.for_model(tuned, 1, 8)
        cache.set_lengths([2])
        tuned(ids[:, :1], cache=cache)


# ---- (5) training ----------------------------------------------------------------------------------------------


def test_the_prefix_trains_through_glmkit_finetune_and_nothing_else_moves(tmp_path):
    tok = WhitespaceTokenizer("a b c d e yes no".split())
    sp = tok.special
    config = ChatGLM6BConfig(
        n_layer=2, n_embd=32, n_head=4, inner_hidden_size=64, vocab_size=32, max_sequence_length=48,
        bos_token_id=sp.sop, eos_token_id=sp.eop, mask_token_id=sp.mask, gmask_token_id=sp.gmask, pad_token_id=sp.pad,
    )  # fmt: skip
    torch.manual_seed(0)
    base = ChatGLM6B(config)
    base.reset_parameters(0.3)  # wide weights: attention, and so the prefix, moves the logits
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = add_prefix(base, 4)
    start = tuned.prefix_encoder.embedding.weight.detach().clone()
    rows = [{"source": f"{w} {w}", "target": "yes" if i % 2 else "no"} for i, w in enumerate("abcde" * 2)]
    args = TrainArgs(
        out_dir=str(tmp_path), max_steps=8, decay_iters=8, micro_batch_size=5, lr=0.1, warmup=0.0, eval_every=8,
        save_every=8, precision="fp32", progress=False, best_metric="loss", best_mode="min",
    )  # fmt: skip
    hist = finetune(tuned, tok, Seq2SeqTask(max_target_length=4), rows, rows[:4], FinetuneArgs(train=args))
    assert hist.losses[-1] < hist.losses[0] - 0.1
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(tuned.prefix_encoder.embedding.weight, start)
    best = tmp_path / "best"
    assert set(load_file(best / "model.safetensors")) == {"transformer.prefix_encoder.embedding.weight"}
    reloaded = load_prefix(ChatGLM6B(config), best)  # a fresh base, given the frozen weights
    reloaded.model.load_state_dict(frozen)
    ids = torch.tensor([[sp.cls, 9, 9, sp.gmask, sp.sop, 14]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids), tuned.eval()(ids))
