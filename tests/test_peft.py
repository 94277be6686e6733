"""Parameter-efficient fine-tuning (glmkit/finetune/peft.py): LoRA through peft on GLM and the ChatGLM models, merged
back into plain models that generation and the fused decode step run, adapter-only checkpoints, a quantized frozen
base (QLoRA-style), and P-tuning v2 prefixes through the KV cache."""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from glmkit import GLM, GLMConfig, kernels
from glmkit.chatglm.hub import load_pretrained as load_chatglm
from glmkit.chatglm.v1 import ChatGLM6B, ChatGLM6BConfig
from glmkit.chatglm.v2 import ChatGLM2, ChatGLM2Config
from glmkit.checkpoint import CheckpointError
from glmkit.config import SpecialTokens
from glmkit.finetune.peft import (
    PrefixTunedGLM,
    add_lora,
    add_prefix,
    count_parameters,
    load_adapter,
    load_prefix,
    merge_lora,
    save_adapter,
    save_prefix,
)
from glmkit.generate import generate
from glmkit.generate.fast import _fused_blocks
from glmkit.kv_cache import KVCache
from glmkit.masks import part_a_positions, part_b_step_positions, prefix_lm_mask
from glmkit.quantize import QuantizedLinear, QuantScheme, quantize_model
from glmkit.train.loop import batch_loss

from .helpers.synthetic import synthetic_source

SPECIAL = SpecialTokens(eos=93, pad=0, cls=90, mask=91, sop=92, eop=93, gmask=94)  # synthetic_source's ids
CONFIG = GLMConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=96, max_sequence_length=48, special_tokens=SPECIAL)


def _glm(seed=0, std=0.02):
    torch.manual_seed(seed)
    return GLM(dataclasses.replace(CONFIG, initializer_range=std)).eval()


def _chatglm2(seed=0):
    torch.manual_seed(seed)
    model = ChatGLM2(ChatGLM2Config())
    model.reset_parameters(std=0.1)
    return model.eval()


def _chatglm6b(seed=0):
    torch.manual_seed(seed)
    config = ChatGLM6BConfig(
        n_layer=2, n_embd=64, n_head=4, inner_hidden_size=128, vocab_size=96, max_sequence_length=64,
        bos_token_id=92, eos_token_id=93, mask_token_id=91, gmask_token_id=90, pad_token_id=0,
    )  # fmt: skip
    model = ChatGLM6B(config)
    model.reset_parameters(std=0.1)
    return model.eval()


def _perturb(model, std=0.2):
    """Nonzero adapters (peft starts B at zero, which would make every check below hold trivially)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "prefix_encoder" in name:
                p.normal_(0, std)


def _train(model, steps=10, lr=1e-2):
    """AdamW on the trainable parameters over one fixed blank-infilling batch; the losses before and after."""
    batch = synthetic_source(batch=4)(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = batch_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        losses.append(batch_loss(model, batch).item())
    return losses[0], losses[-1]


def _frozen_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and "prefix_encoder" not in k}


# ---- LoRA ----------------------------------------------------------------------------------------------------


def test_lora_trains_only_the_adapters_and_lowers_the_blank_infilling_loss():
    model = _glm()
    before = _frozen_state(model)
    lora = add_lora(model, r=4, alpha=8)
    count = count_parameters(lora)
    # r (in + out) per adapted layer: qkv 32+96, attn.proj 32+32, fc 32+128, mlp.proj 128+32, two blocks
    assert count.trainable == 4 * (128 + 64 + 160 + 160) * 2
    assert count.total == count.trainable + sum(v.numel() for v in before.values())
    assert all(("lora_" in n) == p.requires_grad for n, p in lora.named_parameters())
    first, last = _train(lora)
    assert last < first - 0.3  # a random frozen base: the adapters alone fit part of the batch
    after = {k.replace(".base_layer", ""): v for k, v in _frozen_state(model).items()}
    assert after.keys() == before.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.parametrize("bad, message", [("attn.qkvx", "'attn.qkvx' matches no module"), ("attn", "not a linear")])
def test_a_target_that_matches_no_linear_layer_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        add_lora(_glm(), targets=["attn.qkv", bad])
    with pytest.raises(ValueError, match="r: the LoRA rank"):
        add_lora(_glm(), r=0)


def test_merged_glm_is_a_plain_model_with_the_lora_logits_that_generation_and_the_fused_step_run(tmp_path):
    model = _glm()
    lora = add_lora(model, r=4)
    _perturb(lora)
    ids = torch.randint(0, 90, (2, 9))
    unmerged = lora(ids, attention_mask=5).detach()
    tokens = generate(model, [[5, 6, 7, 8]], max_new_tokens=6, kernels=False).new_tokens  # LoRA layers in place
    assert _fused_blocks(copy.deepcopy(model).bfloat16()) is None  # it would skip the adapters: it stays off
    merged = merge_lora(lora)
    assert type(merged) is GLM and not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(ids, attention_mask=5), unmerged, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = GLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reloaded(ids, attention_mask=5), unmerged, rtol=1e-5, atol=1e-5)
    assert generate(reloaded, [[5, 6, 7, 8]], max_new_tokens=6).new_tokens == tokens
    assert (_fused_blocks(reloaded.bfloat16()) is not None) == kernels.available()


@pytest.mark.parametrize("build", [_chatglm2, _chatglm6b])
def test_lora_on_chatglm_merges_and_saves_in_the_hub_layout(build, tmp_path):
    model = build()
    lora = add_lora(model, targets=["attn.qkv", "mlp.fc", "lm_head"] if build is _chatglm2 else ["attn.qkv"], r=2)
    _perturb(lora, 0.3)
    ids = torch.randint(3, 90, (1, 8))
    ids[0, -2:] = torch.tensor([90, 92])  # [gMASK] <sop>, which ChatGLM-6B's hub masks look for
    unmerged = lora(ids).detach()
    assert not torch.allclose(unmerged, build()(ids), atol=1e-3)
    merged = merge_lora(lora)
    merged.save_pretrained(tmp_path / "m")
    reloaded = load_chatglm(tmp_path / "m")
    assert type(reloaded) is type(build())
    torch.testing.assert_close(reloaded(ids), unmerged, rtol=1e-5, atol=1e-5)


def test_adapter_checkpoint_holds_the_adapters_only_and_reloads_the_same_logits(tmp_path):
    lora = add_lora(_glm(), r=4, targets=["attn.qkv", "mlp.proj"])
    _train(lora, steps=3)
    ids = torch.randint(0, 90, (2, 9))
    trained = lora(ids, attention_mask=4).detach()
    save_adapter(lora, tmp_path / "a")
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
        numel = sum(f.get_tensor(k).numel() for k in keys)
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert numel == count_parameters(lora).trainable
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4
    again = load_adapter(_glm(), tmp_path / "a")
    assert torch.equal(again(ids, attention_mask=4), trained)
    assert count_parameters(again).trainable == 0
    assert count_parameters(load_adapter(_glm(), tmp_path / "a", trainable=True)).trainable == numel


def test_an_adapter_for_another_model_or_no_adapter_folder_is_named(tmp_path):
    save_adapter(add_lora(_glm(), r=2), tmp_path / "a")
    wider = GLM(GLMConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=96, max_sequence_length=48))
    with pytest.raises(CheckpointError, match=r"does not fit this model: size mismatch for blocks.0.attn.qkv.lora_A"):
        load_adapter(wider, tmp_path / "a")
    save_adapter(add_lora(_chatglm2(), targets=["lm_head"], r=2), tmp_path / "head")
    with pytest.raises(ValueError, match=r"'lm_head' matches lm_head \(TiedLMHead\), not a linear layer"):
        load_adapter(_glm(), tmp_path / "head")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(_glm(), tmp_path)


@pytest.mark.parametrize("bits", [8, 4])
def test_qlora_trains_over_a_frozen_quantized_base_and_merges_by_requantizing(bits):
    scheme = QuantScheme(bits, 32 if bits == 4 else None, False)
    model = quantize_model(_glm(), scheme)
    frozen = _frozen_state(model)
    lora = add_lora(model, r=4)
    assert isinstance(lora.base_model.model.blocks[0].attn.qkv.base_layer, QuantizedLinear)
    count = count_parameters(lora)
    assert count.trainable == 4 * (128 + 64 + 160 + 160) * 2
    first, last = _train(lora)
    assert last < first - 0.3
    after = {k.replace(".base_layer", ""): v for k, v in _frozen_state(model).items()}
    assert after.keys() == frozen.keys() and all(torch.equal(v, after[k]) for k, v in frozen.items())
    ids = torch.randint(0, 90, (2, 9))
    with torch.no_grad():
        unmerged, base = lora(ids, attention_mask=4), quantize_model(_glm(), scheme)(ids, attention_mask=4)
    merged = merge_lora(lora)
    assert isinstance(merged.blocks[0].mlp.fc, QuantizedLinear)  # still integer, the update folded in
    got = merged(ids, attention_mask=4)
    assert (got - unmerged).abs().max() < 0.25 * (base - unmerged).abs().max()
    assert len(generate(merged, [[5, 6, 7]], max_new_tokens=4).new_tokens[0]) > 0


# ---- P-tuning v2 prefixes --------------------------------------------------------------------------------------


def test_a_glm_prefix_acts_as_keys_and_values_cached_in_front_of_the_text():
    """Set the prefix to the cached keys/values of a 5-token text: the prefixed model then computes what the base
    model computes with that text in its cache, on both the prefill and a decode step."""
    model = _glm()
    text = torch.randint(0, 90, (1, 5))
    cache = KVCache.for_model(model, 1, 16)
    model(text, cache=cache)
    tuned = add_prefix(model, 5)
    kv = torch.stack([cache.k[:, 0, :, :5], cache.v[:, 0, :, :5]], 1)  # [layer, k|v, head, 5, dim]
    with torch.no_grad():
        tuned.prefix_encoder.embedding.weight.copy_(kv.permute(3, 0, 1, 2, 4).reshape(5, -1))
    prompt = torch.randint(0, 90, (1, 6))
    pos = part_a_positions([6], 6)
    want = model(prompt, pos, attention_mask=6, cache=cache)
    assert torch.equal(tuned(prompt, pos, attention_mask=6), want)


def test_generation_with_a_prefix_cached_equals_uncached_and_overflow_is_named():
    tuned = add_prefix(_glm(std=0.3), 4)  # wide weights: varied greedy tokens
    _perturb(tuned, 0.5)
    prompt = [5, 6, 7, 8, 9, CONFIG.special_tokens.gmask]
    out = generate(tuned, [prompt], max_new_tokens=8, kernels=False)
    new = out.new_tokens[0]
    # uncached: the prompt, <sop> and the generated tokens in one pass (GLM's Part A / Part B layout)
    ids = torch.tensor([prompt + [CONFIG.special_tokens.sop] + new[:-1]])
    blank = torch.tensor([len(prompt) - 1])
    part_b = torch.cat([part_b_step_positions(blank, k) for k in range(1, len(new) + 1)], dim=-1)
    pos = torch.cat([part_a_positions([len(prompt)], len(prompt)), part_b], dim=-1)
    with torch.no_grad():
        logits = tuned(ids, pos, attention_mask=len(prompt))[0, len(prompt) :]
    assert logits.argmax(-1).tolist() == new
    base = generate(_glm(std=0.3), [prompt], max_new_tokens=8, kernels=False).new_tokens[0]
    assert base != new  # the prefix is in effect
    # the decode step of a cache (rows of different lengths) equals the uncached pass
    cache = KVCache.for_model(tuned, 1, 32)
    with torch.no_grad():
        tuned(ids[:, : len(prompt)], pos[..., : len(prompt)], prefix_lm_mask([len(prompt)], len(prompt)), cache)
        step = tuned(ids[:, len(prompt) : len(prompt) + 3], pos[..., len(prompt) : len(prompt) + 3], 0, cache)
    torch.testing.assert_close(step[0], logits[:3], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pre_seq_len: a prefix of 49 tokens overflows the context of 49"):
        add_prefix(_glm(), 49)
    with pytest.raises(ValueError, match="prefix of 40 tokens and a text of 10 positions overflow the context of 49"):
        add_prefix(_glm(), 40)(torch.randint(0, 90, (1, 10)))


def test_prefix_training_moves_only_the_prefix_and_round_trips(tmp_path):
    model = _glm()
    frozen = _frozen_state(model)
    tuned = add_prefix(model, 6, projection=True)
    assert isinstance(tuned, PrefixTunedGLM)
    h, kv = CONFIG.n_embd, CONFIG.n_layer * 2 * CONFIG.n_embd
    assert count_parameters(tuned).trainable == 6 * h + h * h + h + h * kv + kv
    first, last = _train(tuned)
    assert last < first - 0.15
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    save_prefix(tuned, tmp_path / "p")
    with safe_open(tmp_path / "p" / "model.safetensors", "pt") as f:
        assert all(k.startswith("transformer.prefix_encoder.") for k in f.keys())
    again = load_prefix(_glm(), tmp_path / "p")
    ids = torch.randint(0, 90, (2, 7))
    assert torch.equal(again(ids, attention_mask=3), tuned(ids, attention_mask=3))


def test_chatglm2_prefix_trains_and_loads_as_released_ptuning_checkpoints_hold_it(tmp_path):
    model = _chatglm2()
    tuned = add_prefix(model, 3)
    assert tuned is model and count_parameters(model).trainable == 3 * 2 * 2 * 2 * 16
    ids = torch.randint(3, 300, (2, 8))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # the released layout: pytorch_model.bin with the prefix only, beside the training run's config.json
    folder = tmp_path / "ptuning"
    folder.mkdir()
    state = {"transformer.prefix_encoder.embedding.weight": model.prefix_encoder.embedding.weight.detach().half()}
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(model.config.to_hub_dict()))
    loaded = load_prefix(_chatglm2(), folder)
    full = tmp_path / "full"
    model.save_pretrained(full)
    hub = load_chatglm(full)  # the hub loader reads a prefix_encoder stored with the model
    with torch.no_grad():
        want = model.prefix_encoder.embedding.weight.half().float()
        model.prefix_encoder.embedding.weight.copy_(want)
        hub.prefix_encoder.embedding.weight.copy_(want)
        torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hub(ids), model(ids), rtol=1e-5, atol=1e-5)
    (folder / "config.json").write_text(json.dumps({"pre_seq_len": 7}))
    with pytest.raises(CheckpointError, match="pre_seq_len=7, the weights hold 3"):
        load_prefix(_chatglm2(), folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"weight \(3, 128\) does not fit this model \(expected \(3, 192\)"):
        load_prefix(GLM(GLMConfig(n_layer=3, n_embd=32, n_head=4, vocab_size=96)), folder)
    with pytest.raises(ValueError, match="overflows the context of 64 .seq_length."):
        add_prefix(_chatglm2(), 64)


def test_lora_on_the_bundled_model_merges_into_what_glmkit_generate_loads(tmp_path):
    from glmkit.bundled import BUNDLED_MODEL, load_model_and_tokenizer
    from glmkit.generate.cli import generate_text

    model, tok = load_model_and_tokenizer()
    lora = add_lora(model, targets=["attn.qkv"], r=2)
    _perturb(lora, 0.05)
    want = generate_text(model, tok, "The capital of France is", max_new_tokens=5, kernels=False)[0].tokens
    merge_lora(lora).save_pretrained(tmp_path / "merged")
    for f in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json"):
        (tmp_path / "merged" / f).write_bytes((BUNDLED_MODEL / f).read_bytes())
    merged, tok = load_model_and_tokenizer(tmp_path / "merged")
    assert generate_text(merged, tok, "The capital of France is", max_new_tokens=5)[0].tokens == want
