"""The continuous-batching engine on a real (tiny) GLM: any batching gives the tokens a request gets alone, slots
are freed, and the async wrapper streams, cancels and drains."""

import asyncio

import pytest

from glmkit.generate import fill_blank_ids, generate
from glmkit.serve.engine import AsyncLLMEngine, EngineClosedError, LLMEngine
from glmkit.serve.scheduler import QueueFullError, SchedulerConfig


@pytest.fixture
def engine(model_and_tokenizer):
    model, tok = model_and_tokenizer
    config = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=64, max_model_len=96, max_queue_size=8)
    return LLMEngine(model, tok, config)


def prompts(tok):
    s = tok.special
    return [
        ("first", [s.cls] + tok.encode("the king said"), dict(max_new_tokens=10)),
        ("first", [s.cls] + tok.encode("go and see [MASK] the lord hath done") + [s.eos], dict(max_new_tokens=7)),
        (
            "first",
            [s.cls] + tok.encode("in the land of egypt for ever and ever"),
            dict(max_new_tokens=12, repetition_penalty=1.3),
        ),
        ("all", [s.cls] + tok.encode("the [MASK] said unto [MASK] go") + [s.eos], dict(max_new_tokens=5)),
        ("first", [s.cls] + tok.encode("what the"), dict(max_new_tokens=6, do_sample=True, seed=3, top_k=20)),
        (
            "all",
            [s.cls] + tok.encode("the [MASK] of [sMASK]") + [s.eos],
            dict(max_new_tokens=4, do_sample=True, seed=5),
        ),
        ("first", [s.cls] + tok.encode("and see"), dict(max_new_tokens=9, min_new_tokens=3, no_repeat_ngram_size=2)),
    ]


def alone(model, tok, fill, ids, kw):
    if fill == "first":
        out = generate(model, ids, tokenizer=tok, **kw)
        return [out.new_tokens[0]], out.finish_reasons[0]
    out = fill_blank_ids(model, ids, tokenizer=tok, **kw)
    return out.spans, out.finish_reasons[-1]


@pytest.mark.parametrize("stagger", [0, 1, 3])
def test_batched_equals_alone(engine, model_and_tokenizer, stagger):
    """Requests join every ``stagger`` steps (0 = all at once) into 3 slots; each gets its solo tokens."""
    model, tok = model_and_tokenizer
    cases = prompts(tok)
    pending = list(enumerate(cases))
    outs: dict[str, list] = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and (stagger == 0 or step % stagger == 0):
            i, (fill, ids, kw) = pending.pop(0)
            engine.add_request(engine.make_request(f"r{i}", ids, fill=fill, **kw))
            if stagger:
                break
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        step += 1
    for i, (fill, ids, kw) in enumerate(cases):
        spans, reason = alone(model, tok, fill, ids, kw)
        last = outs[f"r{i}"][-1]
        assert last.finished and last.finish_reason == reason
        if fill == "first":
            assert [t for o in outs[f"r{i}"] for t in o.token_ids] == spans[0]
        else:
            assert last.spans == spans
    assert engine.scheduler.num_free_slots == 3 and not engine.scheduler.running


def test_stop_strings_logprobs_and_ignore_eos(engine, model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = [tok.special.cls] + tok.encode("the king said")
    free = generate(model, ids, max_new_tokens=12).new_tokens[0]
    stop = tok.decode(free[3:5])
    expected = generate(model, ids, max_new_tokens=12, stop_strings=[stop], tokenizer=tok)
    r = engine.make_request("s", ids, max_new_tokens=12, stop_strings=[stop], logprobs=2)
    outs = engine.generate_blocking([r])["s"]
    assert [t for o in outs for t in o.token_ids] == expected.new_tokens[0]
    assert outs[-1].finish_reason == expected.finish_reasons[0]
    lp = [o.logprobs[0] for o in outs]
    assert all(len(x.top) == 2 and x.logprob <= 0 and x.top[0][1] >= x.logprob for x in lp)
    r = engine.make_request("e", ids, max_new_tokens=5, ignore_eos=True, eos_token_id=free[0])
    assert len(engine.generate_blocking([r])["e"]) == 5


def test_bad_requests_raise_value_error(engine, model_and_tokenizer):
    _, tok = model_and_tokenizer
    with pytest.raises(ValueError, match="no blank"):
        engine.make_request("x", tok.encode("no blank"), fill="all")
    with pytest.raises(ValueError, match="temperature"):
        engine.make_request("x", [3, 7], temperature=0.0, do_sample=True)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(engine.make_request("x", [3] * 60, max_new_tokens=40))
    with pytest.raises(ValueError, match="context"):
        engine.add_request(engine.make_request("x", [3] * 70, max_new_tokens=1))


def test_async_engine_streams_cancels_and_drains(engine, model_and_tokenizer):
    _, tok = model_and_tokenizer
    ids = [tok.special.cls] + tok.encode("the land")

    async def main():
        aeng = AsyncLLMEngine(engine, max_jobs=1).start()
        try:
            full = [o async for o in aeng.generate(engine.make_request("a", ids, max_new_tokens=8))]
            assert sum(len(o.token_ids) for o in full) == 8 and full[-1].finished  # a late reader gets steps joined

            async def consume_two():
                got = []
                async for o in aeng.generate(engine.make_request("b", ids, max_new_tokens=60)):
                    got.append(o)
                    if len(got) == 2:
                        break  # the client went away: the request is aborted
                return got

            assert len(await consume_two()) == 2
            await asyncio.sleep(0.05)
            assert engine.scheduler.num_free_slots == 3 and not engine.has_unfinished_requests()
            assert engine.stats.failures["CANCELED"] == 1

            assert await aeng.drain(timeout=30)
            with pytest.raises(EngineClosedError):
                async for _ in aeng.generate(engine.make_request("late", ids, max_new_tokens=4)):
                    pass
        finally:
            aeng.shutdown()
        # a full queue refuses at once (an engine that is not stepping keeps its queue full)
        idle = AsyncLLMEngine(engine)
        for i in range(8):
            engine.add_request(engine.make_request(f"q{i}", ids, max_new_tokens=4))
        with pytest.raises(QueueFullError):
            async for _ in idle.generate(engine.make_request("over", ids, max_new_tokens=4)):
                pass
        engine.abort([f"q{i}" for i in range(8)])
        assert not engine.has_unfinished_requests()

    asyncio.run(main())
    assert engine.stats.failures["REJECTED"] == 1


@pytest.mark.parametrize("slots", [[1, 2], [3, 0], [2]])
@pytest.mark.parametrize("lengths", [[4, 4], [5, 2]])
def test_kv_cache_rows_match_a_cache_of_their_own(model_and_tokenizer, slots, lengths):
    """Some rows of a pool (contiguous or not, equal or ragged lengths, another dtype) compute what a cache of
    exactly those rows computes."""
    import torch

    from glmkit import KVCache
    from glmkit.generate.engine import prefill
    from glmkit.generate.fast import forward_for
    from glmkit.masks import mask_with_cache

    model, _ = model_and_tokenizer
    rows = [[3] + list(range(20, 20 + n - 1)) for n in lengths[: len(slots)]]
    pool = KVCache.for_model(model, 4, 32, dtype=torch.float64)
    pool.set_lengths([7, 7, 7, 7])  # stale lengths of earlier sequences
    view = pool.rows(slots)
    view.set_lengths([0] * len(slots))
    alone = KVCache.for_model(model, len(slots), 32)
    with torch.no_grad():
        outs = []
        for cache in (alone, view):
            prefill(model, rows, cache)
            one = torch.ones(1, 1, 1, 1, dtype=torch.bool)
            mask = mask_with_cache(one, cache.host_lengths(), len(slots))
            pos = torch.tensor([[[1], [1]]] * len(slots))
            outs.append(forward_for(model)(torch.tensor([[1]] * len(slots)), pos, mask, cache, False))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    assert view.host_lengths() == [len(r) + 1 for r in rows]
    assert [pool.host_lengths()[s] for s in range(4) if s not in slots] == [7] * (4 - len(slots))


def test_scorer_agrees_with_generation(model_and_tokenizer):
    """A continuation is scored as generation produces it: greedy tokens are ``is_greedy``, batched == alone."""
    from glmkit.serve.scoring import Scorer, ScoreRow

    model, tok = model_and_tokenizer
    scorer = Scorer(model, tok.special)
    ctx = [[tok.special.cls] + tok.encode(t) for t in ("the king said", "go and see [MASK] done")]
    greedy = [generate(model, c, max_new_tokens=5).new_tokens[0] for c in ctx]
    rows = [scorer.check(ScoreRow("loglikelihood", c, g)) for c, g in zip(ctx, greedy, strict=True)]
    other = scorer.check(ScoreRow("loglikelihood", ctx[0], tok.encode(" unto them")))
    together = scorer([[rows[0], other], [rows[1], scorer.check(ScoreRow("embedding", ctx[1]))]])
    assert together[0][0].is_greedy and together[1][0].is_greedy and not together[0][1].is_greedy
    alone = scorer([[rows[1]]])[0][0]
    assert abs(alone.logprob - together[1][0].logprob) < 1e-4 and len(alone.token_logprobs) == len(greedy[1])
    assert abs(float(together[1][1].embedding.norm()) - 1) < 1e-5
    with pytest.raises(ValueError, match="continuation"):
        scorer.check(ScoreRow("loglikelihood", ctx[0], []))


def test_scorer_uses_the_models_head_quantized_embeddings_too(model_and_tokenizer):
    """The head goes through the model's own module, so an int8 tied head scores close to full precision."""
    import copy

    from glmkit.quantize import quantize_model
    from glmkit.quantize.modules import QuantScheme
    from glmkit.serve.scoring import Scorer, ScoreRow

    model, tok = model_and_tokenizer
    quantized = copy.deepcopy(model)
    quantize_model(quantized, QuantScheme(8, embeddings=True))
    ctx = [tok.special.cls] + tok.encode("the king said")
    results = []
    for m in (model, quantized):
        scorer = Scorer(m, tok.special)
        rows = [ScoreRow("loglikelihood", ctx, tok.encode(" unto them")), ScoreRow("logits", ctx)]
        results.append(scorer([[scorer.check(r) for r in rows]])[0])
    (full_ll, full_logits), (q_ll, q_logits) = results
    assert abs(full_ll.logprob - q_ll.logprob) < 0.05 * abs(full_ll.logprob)
    assert (full_logits.logits - q_logits.logits).abs().max() < 0.05 * full_logits.logits.abs().max()


def test_a_bf16_model_is_served_on_the_kernels(model_and_tokenizer):
    """The runner puts a bf16 model's linears and LM head on glmkit's kernels (the server's LM head once ran on the
    stock bf16 GEMV: ~2 ms of every GLM-Large step), and serves the same greedy tokens as generate()."""
    import copy

    import torch

    from glmkit import kernels

    if not kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.unavailable_reason()}")
    model, tok = model_and_tokenizer
    half = copy.deepcopy(model).to(torch.bfloat16)
    engine = LLMEngine(half, tok, SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64))
    assert type(half.lm_head) is kernels.FastTiedHead and type(half.blocks[0].mlp.fc) is kernels.FastLinear
    ids = [tok.special.cls] + tok.encode("the king said")
    engine.add_request(engine.make_request("r", ids, max_new_tokens=6))
    served = []
    while engine.has_unfinished_requests():
        served += [t for o in engine.step() for t in o.token_ids]
    assert served == generate(half, [ids], special_tokens=tok.special, max_new_tokens=6).new_tokens[0]


def test_prepacked_weights_serve_the_same_tokens(model_and_tokenizer):
    """``pack_weights``: batches (here 18 streams) multiply with the weights' panels, inside the fused step and in
    the scorer, and serve the same greedy tokens as the kernels alone; released panels serve exactly the same.

    Packing changes how a batch is multiplied, not what: the products of bf16 activations and bf16 weights are exact
    in fp32 either way, only the order of the fp32 sums differs, and with it which way a result rounds to bf16. So
    both runs are bf16 evaluations of the same weights, and their logits (teacher-forced along the served tokens)
    lie within ``bounds.reevaluation_bound`` of each other; each served stream then has the reference's greedy token
    at every step whose top-2 margin exceeds twice that bound, up to a step inside the bound where it may depart."""
    import copy

    import torch

    from glmkit import KVCache, kernels
    from glmkit.generate.engine import GLMStepper, prefill
    from glmkit.generate.fast import cache_dtype, optimize_for_decode
    from tests.helpers.bounds import BF16_UNIT, clear_steps, reevaluation_bound

    if not kernels.available():
        pytest.skip("needs glmkit's kernels")
    model, tok = model_and_tokenizer
    texts = ["the king said", "and moses went", "in the land of"]
    prompt_rows = {f"r{i}": [tok.special.cls] + tok.encode(texts[i % 3]) for i in range(18)}
    served = []
    for pack, release in ((False, False), (True, False), (True, True)):
        half = optimize_for_decode(copy.deepcopy(model).to(torch.bfloat16), pack=pack)
        if release:  # as glmkit serve --pack-weights: the panels are the only copy of the linear weights
            kernels.pack_linear(half, release=True)
            assert half.blocks[0].mlp.fc.weight.numel() == 0
        assert (half.blocks[0].mlp.fc.packed is not None) == pack and (half.lm_head.packed is not None) == pack
        engine = LLMEngine(half, tok, SchedulerConfig(max_num_seqs=18, max_num_batched_tokens=512, max_model_len=48))
        for i in range(18):
            ids = prompt_rows[f"r{i}"]
            engine.add_request(engine.make_request(f"r{i}", ids, max_new_tokens=5, ignore_eos=True))
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                tokens.setdefault(o.request_id, []).extend(o.token_ids)
        served.append(tokens)
        assert list(half.state_dict()) == list(model.state_dict())  # the packed copies are not state
    assert served[2] == served[1]  # the same panels, released or not
    requests = [engine.make_request(k, ids, max_new_tokens=5) for k, ids in prompt_rows.items()]
    fed = torch.tensor([served[0][r.request_id] for r in requests]).T[:-1]

    def teacher_forced(m):
        cache = KVCache.for_model(m, len(requests), 48, dtype=cache_dtype(m))
        with torch.inference_mode():
            prefill(m, [r.prompt_ids for r in requests], cache)
            stepper = GLMStepper(m, cache, torch.tensor([r.blanks[0] for r in requests]), tok.special.sop)
            return torch.stack([stepper.step(None)] + [stepper.step(t) for t in fed]).float()

    exact = teacher_forced(copy.deepcopy(model).to(torch.bfloat16).float())
    plain = teacher_forced(optimize_for_decode(copy.deepcopy(model).to(torch.bfloat16)))
    packed = teacher_forced(optimize_for_decode(copy.deepcopy(model).to(torch.bfloat16), pack=True))
    bound = reevaluation_bound(plain, exact, BF16_UNIT)
    assert (packed - plain).abs().max() <= bound, ((packed - plain).abs().max(), bound)
    clear = clear_steps(plain, bound)
    assert clear.float().mean() >= 0.9  # most steps decide their token: the comparison below is not vacuous
    for run in served:
        for i, r in enumerate(requests):
            greedy = plain[:, i].argmax(-1).tolist()
            for step, (token, reference) in enumerate(zip(run[r.request_id], greedy, strict=True)):
                if not clear[step, i] and token != reference:
                    break  # a near-tie went the other way: the rest of the stream follows another prefix
                assert token == reference, (r.request_id, step)


def test_pack_weights_says_when_there_is_nothing_to_pack(model_and_tokenizer, caplog):
    """An fp32 model has no bf16 weights to prepack: the server still starts, and says so in its log."""
    import copy
    import logging

    from glmkit.serve.server import ServeOptions, build_state

    model, tok = model_and_tokenizer
    with caplog.at_level(logging.WARNING, logger="glmkit.serve"):
        state = build_state(copy.deepcopy(model), tok, ServeOptions(pack_weights=True))
    try:
        assert "pack_weights: nothing packed" in caplog.text
    finally:
        state.engine.shutdown()
        for batcher in state.batchers:
            batcher.shutdown()


def test_pack_weights_holds_the_linears_in_panels_only(model_and_tokenizer, caplog):
    """By default (``--pack-weights`` unset) a bf16 model's linear weights live in panels only (half the memory of
    both copies) and the state dict is unchanged; an fp32 model, or ``--no-pack-weights``, keeps its weights, and
    nothing is logged."""
    import copy
    import logging

    import torch

    from glmkit import kernels
    from glmkit.serve.server import ServeOptions, build_state

    if not kernels.available():
        pytest.skip("needs glmkit's kernels")
    model, tok = model_and_tokenizer

    def served_linears(m, options):
        state = build_state(m, tok, options)
        state.engine.shutdown()
        for batcher in state.batchers:
            batcher.shutdown()
        return [x for x in m.modules() if isinstance(x, kernels.FastLinear)]

    half = copy.deepcopy(model).to(torch.bfloat16)
    before = {k: v.clone() for k, v in half.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="glmkit.serve"):
        linears = served_linears(half, ServeOptions())
        assert linears and all(x.released and x.weight.numel() == 0 for x in linears)
        assert all(torch.equal(half.state_dict()[k], v) for k, v in before.items())
        assert not any(x.released for x in served_linears(copy.deepcopy(model), ServeOptions()))
        off = ServeOptions(pack_weights=False)
        assert not any(x.packed is not None for x in served_linears(copy.deepcopy(model).bfloat16(), off))
    assert "nothing packed" not in caplog.text
