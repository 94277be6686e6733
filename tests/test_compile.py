"""``torch.compile`` with its default backend, inductor (what ``train.compile: true`` runs for the compiled training
figures in README and benchmarks/RESULTS.md, and what ``compile=True`` decoding runs), computes what the eager model
computes.

Error model: inductor fuses the elementwise work and may sum each reduction (the layer norms, softmax, the loss and
the gradients' sums over tokens) in another order, and its vectorised exp/erf/rsqrt may round their last bit
differently; both runs are fp32 evaluations of the same function. So both are compared with the eager fp64
evaluation of the same weights: the eager fp32 run's distance from it is this model's fp32 rounding error, the
compiled run's error is as large (bounds.REROUNDED_SLACK), and the two runs may differ by their sum
(bounds.reevaluation_bound). No relative tolerance is assumed: the bound is measured per tensor.

Dropout is 0 here: inductor lowers the random draws (the seeds of glmkit's hashed dropout masks) to its own generator,
so a compiled step with dropout draws other masks than eager, as PyTorch documents (``fallback_random``)."""

import copy

import pytest
import torch
from torch._inductor import metrics

from glmkit import GLM, GLMConfig, KVCache
from glmkit.generate.engine import GLMStepper, prefill
from glmkit.generate.fast import cache_dtype, optimize_for_decode
from glmkit.kernels.training import use_training_kernels
from glmkit.train.loop import batch_loss
from tests.helpers.bounds import FP32_UNIT, clear_steps, reevaluation_bound
from tests.helpers.generation import SPECIAL
from tests.helpers.synthetic import synthetic_source

pytestmark = pytest.mark.slow  # an inductor compile each: ~40 s on 2 busy cores, small enough for the default run


def _config(**kw) -> GLMConfig:
    return GLMConfig(n_layer=2, n_embd=32, n_head=4, max_sequence_length=48, **kw)


def test_inductor_training_step_equals_eager():
    """The loss and every gradient of a training step through ``torch.compile(model)`` with glmkit's training
    kernels swapped in, as ``fit`` runs it with ``compile=True``, equal the eager step's within the bound."""
    torch.manual_seed(0)
    base = GLM(_config(vocab_size=96, embedding_dropout=0.0, attention_dropout=0.0, output_dropout=0.0))
    batch = synthetic_source(batch=3)(0)

    def step(model: torch.nn.Module, compiled: bool = False) -> dict[str, torch.Tensor]:
        loss = batch_loss(torch.compile(model) if compiled else model, batch)
        loss.backward()
        return {"loss": loss.detach(), **{n: p.grad for n, p in model.named_parameters()}}

    metrics.reset()
    exact = step(copy.deepcopy(base).double().train())
    eager = step(use_training_kernels(copy.deepcopy(base).train()))
    compiled = step(use_training_kernels(copy.deepcopy(base).train()), compiled=True)
    for name, ref in eager.items():
        bound = reevaluation_bound(ref, exact[name], FP32_UNIT)
        assert (compiled[name] - ref).abs().max() <= bound, (name, (compiled[name] - ref).abs().max(), bound)
    assert metrics.generated_kernel_count > 0  # inductor did generate the kernels that ran


def test_inductor_decode_step_equals_eager():
    """``compile=True`` decoding of an fp32 model on glmkit's kernels (as ``generate`` prepares it): each step's
    logits over a prefilled ragged cache equal the eager step's within the bound, so the greedy token is the same
    at every step whose top-2 margin exceeds twice the bound, and most steps have such a margin."""
    torch.manual_seed(0)
    model = GLM(_config(vocab_size=640, special_tokens=SPECIAL)).eval()
    with torch.no_grad():  # logits spread like a trained model's, so that the margins below mean something
        model.wte.weight.mul_(20)
    rows = [[582, 5, 6, 7, 8, 583, 9, 579], [582, 40, 41, 586]]  # ragged Part A: blanks at 5 and 3
    tokens = torch.randint(0, 579, (6, 2), generator=torch.Generator().manual_seed(0))

    def steps(m: GLM, compile: bool = False) -> torch.Tensor:
        cache = KVCache.for_model(m, len(rows), 16, dtype=cache_dtype(m, compile))
        with torch.inference_mode():
            prefill(m, rows, cache)
            stepper = GLMStepper(m, cache, torch.tensor([5, 3]), SPECIAL.sop, compile)
            return torch.stack([stepper.step(None)] + [stepper.step(t) for t in tokens])

    exact = steps(copy.deepcopy(model).double())
    fast = optimize_for_decode(model)
    metrics.reset()
    eager, compiled = steps(fast), steps(fast, compile=True)
    assert metrics.generated_kernel_count > 0
    bound = reevaluation_bound(eager, exact, FP32_UNIT)
    assert (compiled - eager).abs().max() <= bound, ((compiled - eager).abs().max(), bound)
    clear = clear_steps(eager, bound)
    assert clear.float().mean() >= 0.9
    assert torch.equal(compiled.argmax(-1)[clear], eager.argmax(-1)[clear])
