"""Whole ChatGLM hub folders (model + tokenizer) built here: a random model in the hub layout over a tokenizer trained
by ``chatglm_vocab``, so every command that takes ``--model FOLDER`` can run on a ChatGLM-6B or ChatGLM2/3 checkpoint.

The weights are drawn wider than the hub's init (std 0.1) so that greedy decoding has clear winners and varied
tokens, which makes "the same tokens as ``generate()``" a check that could fail."""

from __future__ import annotations

from pathlib import Path

import torch

from glmkit.chatglm.hub import save_pretrained
from glmkit.chatglm.tokenizers import load_chatglm_tokenizer
from glmkit.chatglm.v1 import ChatGLM6B, ChatGLM6BConfig
from glmkit.chatglm.v2 import ChatGLM2, ChatGLM2Config

from .chatglm_vocab import build_chatglm2_tokenizer, build_chatglm6b_tokenizer


def chatglm3_folder(folder: Path, seed: int = 0, seq_length: int = 160) -> Path:
    """A ChatGLM3-layout folder: a 2-layer ChatGLM2-architecture model (4 heads, 2 KV groups) and the ChatGLM3
    tokenizer (role tokens, stop ids ``</s>``, ``<|user|>``, ``<|observation|>``)."""
    build_chatglm2_tokenizer(folder, chatglm3=True)
    tok = load_chatglm_tokenizer(folder)
    config = ChatGLM2Config(
        n_layer=2, n_embd=64, n_head=4, head_size=16, multi_query_group_num=2, ffn_hidden_size=96,
        vocab_size=tok.vocab_size, seq_length=seq_length, eos_token_id=tok.specials.eos, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = ChatGLM2(config)
    model.reset_parameters(std=0.1)
    save_pretrained(model, folder)
    return folder


def chatglm6b_folder(folder: Path, seed: int = 0, max_sequence_length: int = 160) -> Path:
    """A ChatGLM-6B-layout folder: a 2-layer model and the ``ice_text.model`` tokenizer, special ids from it."""
    build_chatglm6b_tokenizer(folder)
    tok = load_chatglm_tokenizer(folder)
    s = tok.specials
    config = ChatGLM6BConfig(
        n_layer=2, n_embd=64, n_head=4, inner_hidden_size=128, vocab_size=tok.vocab_size,
        max_sequence_length=max_sequence_length, bos_token_id=s.sop, eos_token_id=s.eop, mask_token_id=s.mask,
        gmask_token_id=s.gmask, pad_token_id=s.pad,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = ChatGLM6B(config)
    model.reset_parameters(std=0.1)
    save_pretrained(model, folder)
    return folder
