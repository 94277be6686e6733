"""Shared pieces for the generation tests: GLM special ids of the fixtures, a table language model (the harness of
docs/generation-semantics.md), word-level tokenizers (glmkit-style and transformers) and model wrappers."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from glmkit import GLM, SpecialTokens
from glmkit.generate.config import GenerationConfig
from glmkit.generate.engine import Decoding, GenerationOutput

FIXTURE = Path(__file__).parent.parent / "fixtures" / "glm"
SPECIAL = SpecialTokens(eos=579, pad=579, sop=580, eop=581, cls=582, mask=583, sep=584, unk=585, gmask=586, smask=587)
NAMES = {
    579: "<|endoftext|>",
    580: "<|startofpiece|>",
    581: "<|endofpiece|>",
    582: "[CLS]",
    583: "[MASK]",
    584: "[SEP]",
    585: "[UNK]",
    586: "[gMASK]",
    587: "[sMASK]",
}


def fixture_model() -> GLM:
    return GLM.from_pretrained(FIXTURE).eval()


class TableStepper:
    """Next-token logits = ``log(table[full prefix])`` (or ``default``), one prefix per row."""

    def __init__(self, table: dict[tuple[int, ...], list[float]], default: list[float], prompts: list[list[int]]):
        self.table, self.default, self.seqs = table, default, [list(p) for p in prompts]

    def _logits(self, seq: list[int]) -> list[float]:
        return [math.log(p) if p > 0 else -math.inf for p in self.table.get(tuple(seq), self.default)]

    def step(self, tokens: torch.Tensor | None) -> torch.Tensor:
        if tokens is not None:
            for seq, t in zip(self.seqs, tokens.tolist(), strict=True):
                seq.append(t)
        return torch.tensor([self._logits(s) for s in self.seqs])

    def reorder(self, index: torch.Tensor) -> None:
        self.seqs = [list(self.seqs[i]) for i in index.tolist()]


def run_table(table, default, prompts: list[list[int]], pad: int = 0, eos: int = 1, **kwargs) -> GenerationOutput:
    """Decode a table model through the engine's ``Decoding`` (the path ``generate`` uses)."""
    config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, **kwargs)
    repeat = config.num_beams if config.num_beams > 1 else config.num_return_sequences
    P = max(len(p) for p in prompts)
    rows = [p for p in prompts for _ in range(repeat)]
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in rows])
    left = torch.tensor([P - len(p) for p in rows])
    stepper = TableStepper(table, default, rows)
    return Decoding(stepper, ids, left, config, eos_ids=config.eos_ids(), pad_id=pad, position_limit=10**6).run()


class WordTokenizer:
    """glmkit tokenizer API over words ``w0``..``w578`` plus the GLM specials written as in the vocab."""

    special = SPECIAL

    def __init__(self) -> None:
        self.by_name = {name: i for i, name in NAMES.items()}

    def token(self, i: int) -> str:
        return NAMES.get(i, f"w{i}")

    def encode(self, text: str) -> list[int]:
        return [self.by_name[w] if w in self.by_name else int(w[1:]) for w in text.split()]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(self.token(i) for i in ids if not (skip_special_tokens and i in NAMES))


def hf_tokenizer():
    """The same vocabulary as a transformers tokenizer whose template is ``[CLS] text [gMASK] <sop>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = WordTokenizer()
    vocab = {words.token(i): i for i in range(588)} | {"abcdef": 588}  # StopStringCriteria probes this word
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [gMASK] <|startofpiece|>",
        special_tokens=[(NAMES[i], i) for i in (582, 586, 580)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        padding_side="left",
    )


class Recorder(torch.nn.Module):
    """Wraps a GLM and records every forward call (ids, positions, cached lengths)."""

    def __init__(self, model: GLM) -> None:
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache=None, return_hidden=False):
        cached = cache.host_lengths() if cache is not None else None
        self.calls.append((input_ids.tolist(), position_ids.tolist(), cached))
        return self.model(input_ids, position_ids, attention_mask, cache=cache, return_hidden=return_hidden)


class EopAfter(torch.nn.Module):
    """A GLM whose spans end: ``<eop>`` gets +100 once a blank at position p has ``lengths[p]`` tokens."""

    def __init__(self, model: GLM, lengths: dict[int, int]) -> None:
        super().__init__()
        self.model, self.config, self.lengths = model, model.config, lengths

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache=None, return_hidden=False):
        out = self.model(input_ids, position_ids, attention_mask, cache=cache, return_hidden=return_hidden)
        if return_hidden:
            return out
        want = torch.tensor([[self.lengths.get(p, 10**6) for p in row] for row in position_ids[:, 0].tolist()])
        out[..., SPECIAL.eop] += 100.0 * (position_ids[:, 1] > want).to(out.dtype)
        return out


class EopRamp(torch.nn.Module):
    """A GLM whose ``<eop>`` logit grows by ``slope`` per span token: spans end at varied, plausible lengths."""

    def __init__(self, model: GLM, slope: float = 0.3) -> None:
        super().__init__()
        self.model, self.config, self.slope = model, model.config, slope

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache=None, return_hidden=False):
        out = self.model(input_ids, position_ids, attention_mask, cache=cache, return_hidden=return_hidden)
        if not return_hidden:
            out[..., SPECIAL.eop] += self.slope * position_ids[:, 1].to(out.dtype)
        return out
