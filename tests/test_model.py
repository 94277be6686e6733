import subprocess
import sys

import pytest
import torch

from glmkit import GLM, KVCache
from glmkit.masks import make_block_data


def _sample(n_text, spans, order=None):
    return make_block_data([90] + list(range(1, n_text)), spans, mask_id=91, sop_id=92, eop_id=93, order=order)


def _forward(model, s):
    with torch.no_grad():
        return model(torch.tensor([s.tokens]), torch.tensor([[s.position_ids, s.block_position_ids]]), s.sep)[0]


def test_batched_equals_one_at_a_time(tiny_model):
    from glmkit.masks import collate

    samples = [_sample(12, [(2, 4), (7, 10)], [1, 0]), _sample(6, [(3, 5)])]
    batch = collate(samples, pad_id=0)
    with torch.no_grad():
        out = tiny_model(batch["input_ids"], batch["position_ids"], batch["attention_mask"])
    for b, s in enumerate(samples):
        torch.testing.assert_close(out[b, : len(s)], _forward(tiny_model, s), atol=1e-5, rtol=0)


def test_sep_vector_equals_explicit_mask(tiny_model):
    from glmkit.masks import prefix_lm_mask

    ids = torch.randint(0, 90, (2, 9))
    with torch.no_grad():
        a = tiny_model(ids, None, torch.tensor([3, 6]))
        b = tiny_model(ids, None, prefix_lm_mask([3, 6], 9).long())
    assert torch.equal(a, b)


def test_ragged_cache_equals_full_recompute(tiny_model):
    """Rows with different cached lengths (continuous batching) decode exactly like each row alone."""
    samples = [_sample(10, [(2, 5)]), _sample(5, [(1, 3)])]
    cache = KVCache.for_model(tiny_model, 2, 32)
    seps = [s.sep for s in samples]
    width = max(seps)
    ids = torch.zeros(2, width, dtype=torch.long)
    pos = torch.zeros(2, 2, width, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, : s.sep] = torch.tensor(s.tokens[: s.sep])
        pos[b, 0, : s.sep] = torch.tensor(s.position_ids[: s.sep])
    from glmkit.masks import prefix_lm_mask

    with torch.no_grad():
        tiny_model(ids, pos, prefix_lm_mask(seps, width, valid_lengths=seps), cache)
        cache.set_lengths(seps)
        n_b = min(len(s) - s.sep for s in samples)
        outs = []
        for t in range(n_b):
            step_ids = torch.tensor([[s.tokens[s.sep + t]] for s in samples])
            step_pos = torch.tensor([[[s.position_ids[s.sep + t]], [s.block_position_ids[s.sep + t]]] for s in samples])
            outs.append(tiny_model(step_ids, step_pos, 0, cache)[:, 0])
    for b, s in enumerate(samples):
        full = _forward(tiny_model, s)
        torch.testing.assert_close(torch.stack([o[b] for o in outs]), full[s.sep : s.sep + n_b], atol=1e-5, rtol=0)


def test_too_long_input_names_the_limit(tiny_model):
    with pytest.raises(ValueError, match="max_sequence_length"):
        tiny_model(torch.zeros(1, 60, dtype=torch.long))
    pos = torch.zeros(1, 2, 4, dtype=torch.long)
    pos[0, 0, 3] = 49
    with pytest.raises(ValueError, match=r"\[0, 48\]"):
        tiny_model(torch.zeros(1, 4, dtype=torch.long), pos)


def test_bad_mask_and_cache_errors(tiny_model):
    with pytest.raises(ValueError, match=r"shape \(1, 1, 4, 3\)"):
        tiny_model(torch.zeros(1, 4, dtype=torch.long), None, torch.ones(1, 1, 4, 3))
    cache = KVCache.for_model(tiny_model, 1, 4)
    with pytest.raises(ValueError, match="KV cache full"):
        tiny_model(torch.zeros(1, 5, dtype=torch.long), None, 0, cache)


def test_bf16_close_to_fp32(tiny_model):
    s = _sample(12, [(2, 4), (7, 10)])
    ref = _forward(tiny_model, s)
    out = _forward(tiny_model.to(torch.bfloat16), s).float()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_gradient_checkpointing_gives_same_gradients(tiny_config):
    cfg = tiny_config
    cfg.embedding_dropout = cfg.attention_dropout = cfg.output_dropout = 0.0
    model = GLM(cfg).train()
    ids = torch.randint(0, 90, (2, 10))

    def grads(flag):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(ids, None, 4).logsumexp(-1).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b)


def test_tied_head_and_init(tiny_model):
    assert sum(p.numel() for p in tiny_model.parameters()) == tiny_model.config.num_parameters()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        hidden = tiny_model(ids, return_hidden=True)
        torch.testing.assert_close(tiny_model(ids), hidden @ tiny_model.wte.weight.T)  # tied, no bias
    assert tiny_model.blocks[0].attn.qkv.bias.abs().sum() == 0
    out_std = tiny_model.blocks[0].mlp.proj.weight.std().item()
    assert out_std < tiny_model.blocks[0].mlp.fc.weight.std().item()  # scaled init of output projections
    # the block-position table starts at zero (a random row 0 would be one vector added to every Part-A token);
    # the position table keeps the reference's N(0, 0.02)
    assert tiny_model.wbpe.weight.abs().sum() == 0
    assert 0.01 < tiny_model.wpe.weight.std().item() < 0.03


def test_importing_the_model_imports_no_kernels():
    """The kernels sit above the model (they subclass its modules and are swapped in from outside): importing
    glmkit.model, and so the glmkit package, loads nothing of glmkit.kernels."""
    code = "import sys, glmkit.model; print(sorted(m for m in sys.modules if m.startswith('glmkit.kernels')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
