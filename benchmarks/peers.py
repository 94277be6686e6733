"""glmkit against chatglm.cpp on this CPU: single-stream decode speed at each precision, in one interleaved run.

The peer is chatglm.cpp (PyPI ``chatglm-cpp``, the ``chatglm_cpp`` package: ggml's f16 / q8_0 / q4_0 kernels, which
pick their instruction set when they are compiled). Its wheel is built from the sdist on the machine that runs this,
with the CPU's own flags (ggml's build finds AVX2/FMA/F16C by itself but never AVX-512; ``-march=native`` adds it):

    CMAKE_POLICY_VERSION_MINIMUM=3.5 CMAKE_ARGS="-DCMAKE_C_FLAGS=-march=native -DCMAKE_CXX_FLAGS=-march=native" \\
        pip install chatglm-cpp --no-binary chatglm-cpp

It depends on nothing but the standard library at run time; its converter (``chatglm_cpp.convert``) imports
torch, transformers, tabulate and tqdm, which glmkit's environment has.

Three models, all with random weights (decode speed does not depend on the values; greedy decoding is forced to run
exactly ``NEW`` tokens), two of them glmkit's:
- glmkit "glm" (issue 16): a GLM-Large-shaped GLM (24 layers, hidden 1024, 16 heads, FFN 4096, vocab 30592, tied LM
  head; 335 M parameters) in bf16, int8 (per channel) and int4 (group size 32), quantized in memory with
  ``quantize_model``, word embeddings / tied head included (``QuantScheme(..., embeddings=True)``, the default of
  ``glmkit quantize``), as chatglm.cpp quantizes its embeddings and output layer;
- glmkit "chatglm2" (issue 18): chatglm.cpp's own model below, the same random tensors loaded by glmkit's hub loader
  (``GLM.from_pretrained`` of a hub folder written here) and quantized the same way, so both engines read the same
  weights and compute the same network;
- glmkit "chatglm6b" (issue 18) and its chatglm.cpp twin: the same shape in ChatGLM-6B's architecture (24 layers,
  hidden 1024, 16 heads, GELU FFN 4096, LayerNorm, 2D rotary, alpha residuals, output layer tied to the embedding as
  chatglm.cpp's converter requires, vocab 32000; 335 M parameters), converted by chatglm.cpp's ``ChatGLMConverter``;
- chatglm.cpp: a ChatGLM2-architecture model (24 layers, hidden 1024, 16 query heads of 64, ``multi_query_group_num`` 2,
  SwiGLU FFN 2816, RMSNorm, untied output layer, ``seq_length`` 2048; 330 M parameters; its embedding and output rows
  padded past the tokenizer's ids to 32000, as ChatGLM2 pads its 64794 ids to 65024), written to chatglm.cpp's GGML file
  in f16, q8_0 and q4_0 offline by chatglm.cpp's own ``ChatGLM2Converter``, fed a state dict of random tensors under
  ChatGLM2's key names, a config object and a SentencePiece tokenizer trained here on generated text (there is no hub to
  fetch THUDM's modeling code from).

Each precision is paired with its peer: bf16 vs f16, int8 vs q8_0, int4 vs q4_0; the goals: issue 16 (glmkit's GLM
against chatglm.cpp) bf16 >= f16, int8 >= q8_0, int4 >= 1.3x q4_0; issue 18 (the same ChatGLM2 model in both) bf16 >=
f16, int8 >= 1.2x q8_0, int4 >= 1.3x q4_0, and the same for the ChatGLM-6B pair.

Measured: ``--rounds`` rounds (after a warm-up round that is not counted) of the engines (``--families`` picks the
models: glm, chatglm2, chatglm6b), one at a time, each precision's engines back to back (the precisions' order and
the engines' order within them rotating every round), each decode preceded by a memory read bandwidth reading
(``memory_bandwidth_gbs``, fp32 ``sum`` over 512 MiB, best of 1 s): single-stream greedy decoding of 128 new tokens
after a 32-token prompt (glmkit's GLM: ``[CLS] ... [gMASK]``; the ChatGLM2 models: ``[gMASK] <sop> ...``; the
ChatGLM-6B ones: ``... [gMASK] <sop>``), timestamping every token (glmkit: a streamer on ``glmkit.generate.generate``,
which puts the model on glmkit's kernels itself; chatglm.cpp: a loop over ``model.generate_next_token``, the call its
own streaming ``Pipeline`` makes per token). "decode tok/s" = 127 / (last - first token's stamp), the first token (the
prefill) excluded; "e2e" includes it. Reported: medians over the rounds, each glmkit / peer ratio of the decode medians
against its goals with the range of the pair's ratio within each round, and each engine's fraction of the bandwidth
roofline = decode tok/s * bytes of weights read per token / the bandwidth read just before (median over rounds). Bytes
read per token: every weight tensor as stored, except embedding tables read by lookup (one row; the GLM's tied table
counts whole, since its head reads it, as does ChatGLM-6B's in chatglm.cpp) and glmkit's position tables (two rows);
the KV cache is not counted. Threads: chatglm.cpp sets its own (the hardware thread count up to 4, else half of it, at
most 16); glmkit's torch threads are set to the same number.

    python -m benchmarks.peers [--rounds 5] [--families glm,chatglm2,chatglm6b] [--isa avx2|avx512] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.common import Clock, machine, memory_bandwidth_gbs, select_isa
from glmkit import GLM, GLMConfig
from glmkit.config import SpecialTokens
from glmkit.quantize import QuantScheme, quantize_model

L, H, NH, PROMPT, NEW = 24, 1024, 16, 32, 128
GLM_VOCAB = 30592
SPECIAL = SpecialTokens(eos=30522, pad=30522, cls=30523, mask=30524, sop=30525, eop=30526, gmask=30527, smask=30528)
CG_VOCAB, CG_FFN, CG_GROUPS, CG_SEQ, SP_VOCAB = 32000, 2816, 2, 2048, 2000
PAIRS = {"bf16": "f16", "int8": "q8_0", "int4": "q4_0"}  # glmkit precision: its chatglm.cpp peer
SCHEMES = {"bf16": None, "int8": QuantScheme(8, embeddings=True), "int4": QuantScheme(4, 32, embeddings=True)}
# glmkit decode tok/s >= goal x the peer's: issue 16 (glmkit's GLM) and issue 18 (the same ChatGLM2 model)
GOALS = {
    "glm": {"bf16": 1.0, "int8": 1.0, "int4": 1.3},
    "chatglm2": {"bf16": 1.0, "int8": 1.2, "int4": 1.3},
    "chatglm6b": {"bf16": 1.0, "int8": 1.2, "int4": 1.3},
}
SP_SPECIALS = ["<pad>", "[MASK]", "[gMASK]", "<sop>", "<eop>", "<n>"]  # ChatGLM-6B's tokenizer looks these up
GGML_BYTES = {"f32": (4, 1), "f16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}  # (bytes, elements) per block
INSTALL = (
    'CMAKE_POLICY_VERSION_MINIMUM=3.5 CMAKE_ARGS="-DCMAKE_C_FLAGS=-march=native -DCMAKE_CXX_FLAGS=-march=native" '
    "pip install chatglm-cpp --no-binary chatglm-cpp"
)


def chatglm_threads() -> int:
    """The decode thread count chatglm.cpp picks for itself (``get_num_physical_cores`` in chatglm.cpp)."""
    n = os.cpu_count() or 4
    return min(n if n <= 4 else n // 2, 16)


# ---- chatglm.cpp: a random ChatGLM2 model in GGML format ---------------------------------------------------------


def sentencepiece_proto(vocab: int = SP_VOCAB) -> bytes:
    """A small SentencePiece BPE model trained on generated pseudo-words (chatglm.cpp's ChatGLM2 needs one)."""
    import sentencepiece as spm

    rng = torch.Generator().manual_seed(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]

    def word() -> str:
        idx = torch.randint(len(syllables), (int(torch.randint(1, 5, (1,), generator=rng)),), generator=rng)
        return "".join(syllables[i] for i in idx.tolist())

    lines = [" ".join(word() for _ in range(12)) for _ in range(4000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab, model_type="bpe", minloglevel=2,
        user_defined_symbols=SP_SPECIALS,
    )  # fmt: skip
    return buf.getvalue()


def chatglm2_state_dict() -> dict[str, torch.Tensor]:
    """Random weights under ChatGLM2's (Hugging Face ``THUDM/chatglm2-6b``) key names, at GLM-Large's size."""
    g = torch.Generator().manual_seed(0)
    kv = 2 * CG_GROUPS * (H // NH)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    sd = {"transformer.embedding.word_embeddings.weight": w(CG_VOCAB, H)}
    for i in range(L):
        p = f"transformer.encoder.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": torch.ones(H),
            p + "self_attention.query_key_value.weight": w(H + kv, H),
            p + "self_attention.query_key_value.bias": w(H + kv),
            p + "self_attention.dense.weight": w(H, H),
            p + "post_attention_layernorm.weight": torch.ones(H),
            p + "mlp.dense_h_to_4h.weight": w(2 * CG_FFN, H),
            p + "mlp.dense_4h_to_h.weight": w(H, CG_FFN),
        }
    sd["transformer.encoder.final_layernorm.weight"] = torch.ones(H)
    sd["transformer.output_layer.weight"] = w(CG_VOCAB, H)
    return sd


def chatglm2_config() -> SimpleNamespace:
    """The ChatGLM2 config fields ``ChatGLM2Converter`` reads; no EOS id, so decoding never stops early."""
    return SimpleNamespace(
        add_bias_linear=False, add_qkv_bias=True, apply_residual_connection_post_layernorm=False,
        multi_query_attention=True, original_rope=True, post_layer_norm=True, rmsnorm=True,
        hidden_size=H, num_attention_heads=NH, kv_channels=H // NH, multi_query_group_num=CG_GROUPS,
        num_layers=L, ffn_hidden_size=CG_FFN, padded_vocab_size=CG_VOCAB, seq_length=CG_SEQ,
        layernorm_epsilon=1e-5, pre_seq_len=None, eos_token_id=None, pad_token_id=0, quantization_bit=None,
    )  # fmt: skip


def chatglm6b_state_dict() -> dict[str, torch.Tensor]:
    """Random weights under ChatGLM-6B's (``THUDM/chatglm-6b``) key names at GLM-Large's size, the output layer tied."""
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    sd = {"transformer.word_embeddings.weight": w(CG_VOCAB, H)}
    for i in range(L):
        p = f"transformer.layers.{i}."
        for name, out, inp in (
            ("attention.query_key_value", 3 * H, H), ("attention.dense", H, H),
            ("mlp.dense_h_to_4h", 4 * H, H), ("mlp.dense_4h_to_h", H, 4 * H),
        ):  # fmt: skip
            sd[p + name + ".weight"], sd[p + name + ".bias"] = w(out, inp), w(out)
        for name in ("input_layernorm", "post_attention_layernorm"):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = torch.ones(H), torch.zeros(H)
    sd["transformer.final_layernorm.weight"], sd["transformer.final_layernorm.bias"] = torch.ones(H), torch.zeros(H)
    sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"]
    return sd


def chatglm6b_config(sp_model) -> SimpleNamespace:
    """The ChatGLM-6B config fields ``ChatGLMConverter`` reads (no EOS id: decoding never stops early), with the
    special ids of ``sp_model``."""
    ids = {n: sp_model.piece_to_id(t) for n, t in (("bos", "<sop>"), ("mask", "[MASK]"), ("gmask", "[gMASK]"))}
    return SimpleNamespace(
        position_encoding_2d=True, hidden_size=H, num_attention_heads=NH, num_layers=L, inner_hidden_size=4 * H,
        vocab_size=CG_VOCAB, max_sequence_length=CG_SEQ, layernorm_epsilon=1e-5, pre_seq_len=None,
        quantization_bit=None, eos_token_id=None, pad_token_id=sp_model.piece_to_id("<pad>"),
        bos_token_id=ids["bos"], mask_token_id=ids["mask"], gmask_token_id=ids["gmask"],
    )  # fmt: skip


def write_ggml(folder: Path, family: str, sd: dict, sp_model) -> tuple[dict[str, Path], dict[str, int]]:
    """``family``'s random model (chatglm2 or chatglm6b, state dict ``sd``) as GGML files per peer type, and the
    bytes each reads per decoded token."""
    from chatglm_cpp.convert import ChatGLM2Converter, ChatGLMConverter, GGMLType

    if family == "chatglm2":
        converter, config = ChatGLM2Converter, chatglm2_config()
        tokenizer = SimpleNamespace(tokenizer=SimpleNamespace(sp_model=sp_model))
    else:
        converter, config = ChatGLMConverter, chatglm6b_config(sp_model)
        tokenizer = SimpleNamespace(sp_tokenizer=SimpleNamespace(text_tokenizer=SimpleNamespace(sp=sp_model)))
    model = SimpleNamespace(config=config, state_dict=lambda: sd)
    paths, nbytes = {}, {}
    for ggml in PAIRS.values():
        paths[ggml] = folder / f"{family}-{ggml}.bin"
        with open(paths[ggml], "wb") as f, contextlib.redirect_stdout(io.StringIO()):  # a table and a progress
            with contextlib.redirect_stderr(io.StringIO()):  # bar per file
                converter.convert(f, model, tokenizer, GGMLType[ggml.upper()])
        nbytes[ggml] = 0
        for name, t in sd.items():
            if name == "lm_head.weight":  # ChatGLM-6B's output layer is its embedding, held once
                continue
            size, per = GGML_BYTES[ggml if t.dim() == 2 else "f32"]  # matrices in the file's type, vectors in f32
            # an untied embedding is read by lookup (one row); ChatGLM-6B's is also its output layer (every row)
            rows = 1 if name.endswith("word_embeddings.weight") and family == "chatglm2" else t.shape[0]
            nbytes[ggml] += rows * t[0].numel() // per * size if t.dim() == 2 else t.numel() * size
    return paths, nbytes


def run_chatglm(pipeline, prompt: list[int]) -> tuple[float, float]:
    """Greedy decode of ``NEW`` tokens, one ``generate_next_token`` each: (end-to-end, decode) tokens/s."""
    import chatglm_cpp

    cfg = chatglm_cpp._C.GenerationConfig(max_length=CG_SEQ, max_new_tokens=NEW, do_sample=False)
    ids, n_past, stamps = list(prompt), 0, []
    start = time.perf_counter()
    for _ in range(NEW):  # as Pipeline._stream_generate_ids does, without its stop on EOS
        token = pipeline.model.generate_next_token(ids, None, cfg, n_past, len(prompt))
        stamps.append(time.perf_counter())
        n_past = len(ids)
        ids.append(token)
    assert len(ids) == PROMPT + NEW and all(0 <= t < CG_VOCAB for t in ids[PROMPT:])
    return NEW / (stamps[-1] - start), (NEW - 1) / (stamps[-1] - stamps[0])


# ---- glmkit ---------------------------------------------------------------------------------------------------------


def glm_models() -> dict[str, GLM]:
    torch.manual_seed(0)
    cfg = GLMConfig(
        n_layer=L, n_embd=H, n_head=NH, vocab_size=GLM_VOCAB, max_sequence_length=512, special_tokens=SPECIAL
    )
    base = GLM(cfg).eval()
    return {  # quantized from fp32 weights; the rest of the model (norms, biases, scales) in bf16
        p: (quantize_model(copy.deepcopy(base), s) if s else copy.deepcopy(base)).to(torch.bfloat16)
        for p, s in SCHEMES.items()
    }


def hub_models(folder: Path, family: str, sd: dict[str, torch.Tensor], sp_model) -> dict[str, torch.nn.Module]:
    """chatglm.cpp's random tensors of ``family`` as a hub folder, loaded by glmkit and quantized as ``glm_models``."""
    from safetensors.torch import save_file

    if family == "chatglm2":
        c = vars(chatglm2_config())
        hub = {k: v for k, v in c.items() if k not in ("quantization_bit", "pre_seq_len")} | {
            "model_type": "chatglm", "eos_token_id": 2, "torch_dtype": "float32", "tie_word_embeddings": False,
        }  # fmt: skip
    else:
        c = vars(chatglm6b_config(sp_model))
        hub = {k: v for k, v in c.items() if k not in ("quantization_bit", "pre_seq_len")} | {
            "model_type": "chatglm", "eos_token_id": sp_model.piece_to_id("<eop>"), "torch_dtype": "float32",
        }  # fmt: skip
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hub))
    save_file({k: v.clone() for k, v in sd.items()}, str(folder / "model.safetensors"))
    base = GLM.from_pretrained(folder, dtype=torch.float32).eval()
    return {
        p: (quantize_model(copy.deepcopy(base), s) if s else copy.deepcopy(base)).to(torch.bfloat16)
        for p, s in SCHEMES.items()
    }


def glm_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every tensor as held but the position tables, of which it reads two rows, and an
    untied model's word embeddings, of which it reads one row per token."""
    lookup = ("wpe.", "wbpe.") + (() if type(model) is GLM else ("wte.",))
    return sum(
        t.element_size() * (t.numel() // t.shape[0] * (1 if name.startswith("wte.") else 2))
        if name.startswith(lookup)
        else t.element_size() * t.numel()
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    )


def run_glm(model: torch.nn.Module, prompt: list[int]) -> tuple[float, float]:
    from glmkit.generate import generate

    clock = Clock()
    kw = dict(eos_token_id=GLM_VOCAB, special_tokens=SPECIAL) if type(model) is GLM else dict(eos_token_id=CG_VOCAB)
    out = generate(model, prompt, max_new_tokens=NEW, streamer=clock, **kw)
    assert len(out.new_tokens[0]) == NEW  # eos_token_id outside the vocabulary: never stops early
    n = len(clock.stamps)
    return n / (clock.stamps[-1] - clock.start), (n - 1) / (clock.stamps[-1] - clock.stamps[0])


# ---- the run --------------------------------------------------------------------------------------------------------


PEER = {"glm": "chatglm.cpp", "chatglm2": "chatglm.cpp", "chatglm6b": "chatglm.cpp 6b"}  # family: its peer's name
OURS = {"glm": "glmkit", "chatglm2": "glmkit chatglm2", "chatglm6b": "glmkit chatglm6b"}


@torch.inference_mode()
def measure(rounds: int, families: list[str]) -> dict:
    import chatglm_cpp
    import sentencepiece as spm

    threads = chatglm_threads()
    torch.set_num_threads(threads)
    rng = torch.Generator().manual_seed(0)
    glm_prompt = [SPECIAL.cls, *torch.randint(1000, 30000, (PROMPT - 2,), generator=rng).tolist(), SPECIAL.gmask]
    body = torch.randint(len(SP_SPECIALS) + 3, SP_VOCAB, (PROMPT - 2,), generator=rng).tolist()  # no special id
    sp_model = spm.SentencePieceProcessor(model_proto=sentencepiece_proto())
    gmask, sop = sp_model.piece_to_id("[gMASK]"), sp_model.piece_to_id("<sop>")
    engines, nbytes = {}, {}
    with tempfile.TemporaryDirectory(prefix="glmkit-peers-") as tmp:
        if "glm" in families:
            for p, m in glm_models().items():
                engines[f"glmkit {p}"], nbytes[f"glmkit {p}"] = (run_glm, m, glm_prompt), glm_bytes(m)
        for family, sd_of in (("chatglm2", chatglm2_state_dict), ("chatglm6b", chatglm6b_state_dict)):
            if family not in families and not (family == "chatglm2" and "glm" in families):  # glm's peer: chatglm2's
                continue
            sd = sd_of()
            paths, cg_bytes = write_ggml(Path(tmp), family, sd, sp_model)
            pipes = {g: chatglm_cpp.Pipeline(str(path)) for g, path in paths.items()}
            if family == "chatglm2":  # its prompt starts [gMASK] <sop> (its tokenizer's prefix)
                ours_prompt = peer_prompt = pipes["f16"].tokenizer.encode("", PROMPT) + body
            else:  # `text [gMASK] <sop>`; glmkit's engine feeds the <sop> itself
                ours_prompt, peer_prompt = [*body, gmask], [*body, gmask, sop]
            for g, pipe in pipes.items():
                name = f"{PEER[family]} {g}"
                engines[name], nbytes[name] = (run_chatglm, pipe, peer_prompt), cg_bytes[g]
            if family in families:
                for p, m in hub_models(Path(tmp) / f"{family}-hub", family, sd, sp_model).items():
                    name = f"{OURS[family]} {p}"
                    engines[name], nbytes[name] = (run_glm, m, ours_prompt), glm_bytes(m)
        groups = [[n for n in engines if n.endswith(f" {p}") or n.endswith(f" {g}")] for p, g in PAIRS.items()]
        runs = {name: [] for name in engines}
        for r in range(rounds + 1):  # round 0 warms up (kernel builds, allocators, page faults) and is dropped
            # a precision's decodes run back to back, the precisions' and the engines' order rotating
            for group in groups[r % len(groups) :] + groups[: r % len(groups)]:
                for name in group[r % len(group) :] + group[: r % len(group)]:
                    fn, model, prompt = engines[name]
                    bw = memory_bandwidth_gbs(seconds=1.0)  # right before this decode: the machine's speed drifts
                    e2e, decode = fn(model, prompt)
                    runs[name] += [{"e2e_tps": e2e, "decode_tps": decode, "bandwidth_gbs": bw}] if r else []
    out = {"machine": machine(), "threads": {"glmkit": torch.get_num_threads(), "chatglm.cpp": threads},
           "chatglm_cpp_version": chatglm_cpp.__version__, "rounds": rounds, "prompt_tokens": PROMPT,
           "new_tokens": NEW, "engines": {}, "ratios": {f: {} for f in families}}  # fmt: skip
    for name, rs in runs.items():
        out["engines"][name] = {
            "decode_tps": statistics.median(x["decode_tps"] for x in rs),
            "e2e_tps": statistics.median(x["e2e_tps"] for x in rs),
            "bytes_per_token": nbytes[name],
            "roofline_fraction": statistics.median(
                x["decode_tps"] * nbytes[name] / 1e9 / x["bandwidth_gbs"] for x in rs
            ),
            "decode_tps_all": [round(x["decode_tps"], 2) for x in rs],
            "bandwidth_gbs_all": [round(x["bandwidth_gbs"], 1) for x in rs],
        }
    for family in families:
        for p, g in PAIRS.items():
            ours, theirs = out["engines"][f"{OURS[family]} {p}"], out["engines"][f"{PEER[family]} {g}"]
            ratio, goal = ours["decode_tps"] / theirs["decode_tps"], GOALS[family][p]
            paired = [a / b for a, b in zip(ours["decode_tps_all"], theirs["decode_tps_all"], strict=True)]
            out["ratios"][family][p] = {
                "peer": f"{PEER[family]} {g}", "glmkit_over_peer": ratio, "goal": goal, "met": ratio >= goal,
                "paired_per_round": [round(x, 3) for x in paired],
            }  # fmt: skip
    return out


def report(r: dict) -> None:
    print(r["machine"])
    print(f"chatglm.cpp {r['chatglm_cpp_version']}; threads: glmkit {r['threads']['glmkit']}, chatglm.cpp "
          f"{r['threads']['chatglm.cpp']}; {r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens, "
          f"medians of {r['rounds']} rounds")  # fmt: skip
    bw = [b for e in r["engines"].values() for b in e["bandwidth_gbs_all"]]
    print(f"memory bandwidth before each decode: median {statistics.median(bw):.1f} GB/s, {min(bw):.1f}-{max(bw):.1f}")
    print(f"{'engine':24s} {'decode tok/s':>12s} {'e2e tok/s':>9s} {'MB/token':>8s} {'roofline':>8s}  per round")
    for name, e in r["engines"].items():
        print(f"{name:24s} {e['decode_tps']:12.1f} {e['e2e_tps']:9.1f} {e['bytes_per_token'] / 1e6:8.0f} "
              f"{e['roofline_fraction']:8.0%}  {e['decode_tps_all']}")  # fmt: skip
    for family, ratios in r["ratios"].items():
        for p, x in ratios.items():
            pr = x["paired_per_round"]
            print(f"glmkit {family} {p} / {x['peer']}: {x['glmkit_over_peer']:.2f}x (goal >= {x['goal']:.1f}x: "
                  f"{'met' if x['met'] else 'not met'}); within each round {min(pr):.2f}-{max(pr):.2f}x")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--families", default=",".join(GOALS), help=f"comma-separated, of {', '.join(GOALS)}")
    ap.add_argument("--isa", choices=["avx2", "avx512"], help="run glmkit's kernels built for this instruction set")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    families = [f for f in args.families.split(",") if f]
    if not families or set(families) - set(GOALS):
        ap.error(f"--families: expected a comma-separated list of {', '.join(GOALS)}, got {args.families!r}")
    try:
        import chatglm_cpp  # noqa: F401
    except ImportError:
        sys.exit(f"benchmarks.peers: chatglm_cpp is not installed; build it from source with: {INSTALL}")
    select_isa(args.isa)
    res = measure(args.rounds, families)
    report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
