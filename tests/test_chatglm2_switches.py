"""The ChatGLM2 config switches that no released checkpoint or transformers class exercises (LayerNorm instead of
RMSNorm, residuals after the norm, no final norm, biases on every linear layer, per-head QKV without multi-query),
checked against an independent transcription of the THUDM hub ``modeling_chatglm.py`` forward: its ``[S, B, H]``
layout, ``apply_rotary_pos_emb`` on ``(x[2i], x[2i+1])`` pairs of a ``[S, rot/2, 2]`` cos/sin cache, KV groups
widened with ``unsqueeze(-2).expand``, and ``GLMBlock``'s residual choice, on random weights in the hub layout."""

import pytest
import torch
import torch.nn.functional as F

from glmkit.chatglm import ChatGLM2, ChatGLM2Config
from glmkit.chatglm.hub import v2_hub_names


def _norm(x, w, b, c):
    if c.rmsnorm:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.layernorm_eps))
    return F.layer_norm(x, (x.shape[-1],), w, b, c.layernorm_eps)


def hub_forward(sd: dict, c: ChatGLM2Config, ids: torch.Tensor) -> torch.Tensor:
    """``ChatGLMForConditionalGeneration(input_ids)`` for a batch without padding, as the hub code computes it."""
    S, B = ids.shape[1], ids.shape[0]
    np_, hn, g = c.n_head, c.head_size, c.n_kv_head
    rot = hn // 2
    base = 10000 * c.rope_ratio
    theta = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float) / rot))
    idx_theta = torch.outer(torch.arange(S, dtype=torch.float), theta)
    cache = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)  # [S, rot/2, 2]

    def rope(x):  # [S, B, np, hn]
        x, x_pass = x[..., :rot], x[..., rot:]
        xs = x.reshape(S, B, -1, rot // 2, 2)
        rc = cache.view(S, 1, 1, rot // 2, 2)
        out = torch.stack(
            [xs[..., 0] * rc[..., 0] - xs[..., 1] * rc[..., 1], xs[..., 1] * rc[..., 0] + xs[..., 0] * rc[..., 1]], -1
        )
        return torch.cat([out.flatten(3), x_pass], dim=-1)

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))

    def norm(x, name):
        return _norm(x, sd[name + ".weight"], sd.get(name + ".bias"), c)

    x = sd["transformer.embedding.word_embeddings.weight"][ids].transpose(0, 1)  # [S, B, H]
    for i in range(c.n_layer):
        p = f"transformer.encoder.layers.{i}."
        ln = norm(x, p + "input_layernorm")
        mixed = lin(ln, p + "self_attention.query_key_value")
        if c.multi_query_attention:
            q, k, v = mixed.split([np_ * hn, g * hn, g * hn], dim=-1)
            q, k, v = q.view(S, B, np_, hn), k.view(S, B, g, hn), v.view(S, B, g, hn)
        else:
            q, k, v = mixed.view(S, B, np_, 3 * hn).split(hn, dim=-1)
        q, k = rope(q), rope(k)
        if c.multi_query_attention:
            k = k.unsqueeze(-2).expand(-1, -1, -1, np_ // g, -1).reshape(S, B, np_, hn)
            v = v.unsqueeze(-2).expand(-1, -1, -1, np_ // g, -1).reshape(S, B, np_, hn)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True).permute(2, 0, 1, 3).reshape(S, B, np_ * hn)
        attn = lin(ctx, p + "self_attention.dense")
        x = (ln if c.apply_residual_connection_post_layernorm else x) + attn
        ln = norm(x, p + "post_attention_layernorm")
        a, b = lin(ln, p + "mlp.dense_h_to_4h").chunk(2, dim=-1)
        mlp = lin(F.silu(a) * b, p + "mlp.dense_4h_to_h")
        x = (ln if c.apply_residual_connection_post_layernorm else x) + mlp
    if c.post_layer_norm:
        x = norm(x, "transformer.encoder.final_layernorm")
    return F.linear(x, sd["transformer.output_layer.weight"]).transpose(0, 1)


SWITCHES = {
    "released": {},
    "layernorm": {"rmsnorm": False},
    "post_ln_residual": {"apply_residual_connection_post_layernorm": True},
    "no_final_norm": {"post_layer_norm": False},
    "all_biases": {"add_bias_linear": True, "add_qkv_bias": False},
    "per_head_qkv": {"multi_query_attention": False},
    "everything": {"rmsnorm": False, "apply_residual_connection_post_layernorm": True, "post_layer_norm": False}
    | {"add_bias_linear": True, "multi_query_attention": False, "rope_ratio": 3.0},
}


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_switches_match_the_hub_formulation(switch):
    shape = {"n_layer": 2, "n_embd": 40, "n_head": 6, "head_size": 12, "multi_query_group_num": 3}
    config = ChatGLM2Config(**shape, ffn_hidden_size=56, vocab_size=50, **SWITCHES[switch])
    model = ChatGLM2(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name or "ln_f" in name else 0.2 * torch.randn_like(p))
        names = {ours: hub for hub, ours in v2_hub_names(config).items()}
        hub_state = {names[k]: v for k, v in model.state_dict().items()}
        ids = torch.randint(0, 50, (2, 13))
        expected = hub_forward(hub_state, config, ids)
        err = (model(ids) - expected).abs().max().item()
    assert err < 5e-5, f"{switch}: max |diff| {err:.2e}"  # the chatglm2 fixture's tolerance
    assert expected.abs().max() > 1
