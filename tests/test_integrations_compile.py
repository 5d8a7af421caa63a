"""torch.compile of a model patched by apply_rlhf_ops (tiny random-init Llama, no download).

* one graph, no graph break (torch._dynamo.explain), for a dense batch, a padded batch and a
  packed batch (cu_seq_lens), on the reference and the Triton (interpreter) backends: nothing in
  the metadata path reads a tensor on the host;
* torch.compile(fullgraph=True, dynamic=True): a second sequence length reuses the graph (no
  recompilation), and the compiled training step (aot_eager: forward and backward graphs) gives
  the eager patched model's loss and gradients;
* a batch packed by position_ids alone cannot be cut without a host read: under compile it raises
  (a device assertion) instead of attending across sequences.
"""
import pytest
import torch

pytest.importorskip("transformers")

from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

from rlhf_ops.integrations.transformers import apply_rlhf_ops  # noqa: E402
from _util import rel_err  # noqa: E402
from conftest import backend_problem  # noqa: E402
from test_integrations_transformers import batch, tiny  # noqa: E402

TOL = 1e-5


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    why = backend_problem(request.param)
    if why:
        pytest.skip(why)
    return request.param


def _fresh(inp):
    """Inputs as a collator makes them: separate tensors (views of one tensor make dynamo equate
    their sizes, and a later batch with other sizes recompiles)."""
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in inp.items()}


@pytest.mark.parametrize("kind", ["dense", "mixed", "packed_cu"])
def test_one_graph_no_break(backend, kind):
    torch.manual_seed(0)
    model = apply_rlhf_ops(tiny("llama", 1), backend=backend)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model)(**_fresh(batch(kind)), use_cache=False)
    assert ex.graph_break_count == 0, [str(b.reason) for b in ex.break_reasons]
    assert ex.graph_count == 1


def _step(fn, model, inp):
    """loss and the gradient of each of model's parameters after one step of fn (model or its
    compiled form)."""
    model.zero_grad(set_to_none=True)
    out = fn(**inp, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_training_step_dynamic_lengths():
    """fullgraph=True, dynamic=True, aot_eager (forward + backward graphs): padded batches of two
    lengths and a packed one; the same loss and gradients as the eager patched model; the second
    length reuses the graph."""
    torch.manual_seed(0)
    model = apply_rlhf_ops(tiny("llama", 1), backend="reference")
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for inp in (batch("mixed", T=10), batch("mixed", T=13, seed=2), batch("packed_cu")):
        inp = _fresh(inp)
        loss, grads = _step(compiled, model, inp)
        frames.append(counter.frame_count)
        want_loss, want_grads = _step(model, model, inp)
        assert rel_err(loss, want_loss) <= TOL
        for name, g in want_grads.items():
            assert rel_err(grads[name], g) <= TOL, name
    assert frames[0] > 0 and frames[1] == frames[0]          # T = 13 reuses the T = 10 graph


def test_dynamic_lengths_triton():
    why = backend_problem("triton")
    if why:
        pytest.skip(why)
    torch.manual_seed(0)
    model = apply_rlhf_ops(tiny("llama", 1), backend="triton")
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    for T in (10, 13):
        inp = _fresh(batch("mixed", T=T))
        got = compiled(**inp, use_cache=False).loss
        assert rel_err(got, model(**inp, use_cache=False).loss) <= TOL
    assert counter.frame_count == 1


def test_position_ids_packing_under_compile_raises():
    torch.manual_seed(0)
    model = apply_rlhf_ops(tiny("llama", 1), backend="reference")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    with pytest.raises(RuntimeError, match="under torch.compile, a packed batch needs cu_seq_lens"):
        compiled(**_fresh(batch("packed")), use_cache=False)
    dense = _fresh(batch("dense"))                                   # position_ids of one sequence
    pos = torch.arange(10).expand(3, 10).clone()
    assert rel_err(compiled(**dense, position_ids=pos, use_cache=False).loss,
                   model(**dense, position_ids=pos, use_cache=False).loss) <= TOL
