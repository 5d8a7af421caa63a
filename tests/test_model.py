"""The minimal GPT: tied unembedding, LM loss through rlhf_ops, causality, generate, scalar head."""
import pytest
import torch
import torch.nn.functional as F

import rlhf_ops as ro
from rlhf_ops.train.model import GPT, GPTConfig, ScalarHeadGPT, frozen_copy

CFG = GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, d_model=16, backend="reference")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: with two OpenMP threads on a busy 2-core machine every op waits for a time
    # slice (measured: 17 ms per linear of [4, 32] × [32, 96]); one thread runs them at once
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_lm_loss_matches_eager_cross_entropy_in_float64():
    m = GPT(CFG).double()
    x = torch.randint(0, 13, (3, 11))
    y = torch.randint(0, 13, (3, 11))
    y[0, :4] = -100
    logits = m(x)
    assert logits.shape == (3, 11, 13)
    ref = F.cross_entropy(logits.reshape(-1, 13), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(m(x, y), ref, rtol=1e-12, atol=1e-12)
    per_tok = m(x, y, reduction="none")
    assert per_tok.shape == (33,) and float(per_tok.detach().view(3, 11)[0, :4].abs().sum()) == 0.0


def test_unembedding_is_tied_to_token_embedding():
    m = GPT(CFG)
    h = m.trunk(torch.randint(0, 13, (2, 5)))
    torch.testing.assert_close(m(torch.randint(0, 13, (2, 5))).shape, torch.Size([2, 5, 13]))
    x = torch.randint(0, 13, (2, 5))
    torch.testing.assert_close(m(x), m.trunk(x) @ m.trunk.wte.weight.T)
    assert not any("head" in n for n, _ in m.named_parameters())
    del h


def test_causal_future_tokens_do_not_change_past_logits():
    m = GPT(CFG)
    x = torch.randint(0, 13, (2, 9))
    x2 = x.clone()
    x2[:, 6:] = torch.randint(0, 13, (2, 3))
    torch.testing.assert_close(m(x)[:, :6], m(x2)[:, :6])


def test_block_size_error_names_it():
    with pytest.raises(ValueError, match="block_size"):
        GPT(CFG)(torch.zeros(1, 17, dtype=torch.long))


def test_generate_batched_rows_match_rows_alone():
    m = GPT(CFG)
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11]]
    P = torch.zeros(3, 4, dtype=torch.long)
    for i, p in enumerate(prompts):
        P[i, :len(p)] = torch.tensor(p)
    n = torch.tensor([4, 2, 3])
    seq, rl = m.generate(P, n, 6, greedy=True, eos=1, pad=0)
    for i, p in enumerate(prompts):
        s1, r1 = m.generate(torch.tensor([p]), torch.tensor([len(p)]), 6, greedy=True, eos=1, pad=0)
        assert int(rl[i]) == int(r1[0])
        assert seq[i, :len(p) + int(rl[i])].tolist() == s1[0, :len(p) + int(r1[0])].tolist()
        assert (seq[i, len(p) + int(rl[i]):] == 0).all()                # pad after the response


def test_generate_stops_at_eos_and_sampling_is_seeded():
    m = GPT(CFG)
    with torch.no_grad():                       # make EOS (id 1) overwhelmingly likely
        m.trunk.wte.weight[1] += 5 * m.trunk.ln_f.bias.new_ones(16)
        m.trunk.ln_f.bias.fill_(3.0)
    P, n = torch.tensor([[3, 4, 5]]), torch.tensor([3])
    seq, rl = m.generate(P, n, 5, greedy=True, eos=1, pad=0)
    assert int(rl[0]) == 1 and int(seq[0, 3]) == 1 and (seq[0, 4:] == 0).all()
    m2 = GPT(CFG)
    a = m2.generate(P.repeat(4, 1), n.repeat(4), 5, generator=torch.Generator().manual_seed(1), eos=99)
    b = m2.generate(P.repeat(4, 1), n.repeat(4), 5, generator=torch.Generator().manual_seed(1), eos=99)
    assert torch.equal(a[0], b[0])


def test_scalar_head_reads_last_token_and_copies_trunk():
    lm = GPT(CFG)
    rm = ScalarHeadGPT.from_lm(lm)
    torch.nn.init.normal_(rm.head.weight)
    x = torch.randint(0, 13, (4, 7))
    last = torch.tensor([6, 0, 3, 5])
    values = rm(x)
    assert values.shape == (4, 7)
    torch.testing.assert_close(rm(x, last), values[torch.arange(4), last])
    torch.testing.assert_close(rm.trunk(x), lm.trunk(x))
    # the reward at a response's last token ignores the padding after it
    x2 = x.clone()
    x2[2, 4:] = 0
    torch.testing.assert_close(rm(x2, last)[2], rm(x, last)[2])


def test_frozen_copy_has_no_grad_and_is_independent():
    m = GPT(CFG)
    f = frozen_copy(m)
    assert all(not p.requires_grad for p in f.parameters())
    with torch.no_grad():
        m.trunk.wte.weight.add_(1.0)
    assert not torch.equal(f.trunk.wte.weight, m.trunk.wte.weight)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_meta_device_forward_backward(backend):
    with torch.device("meta"):
        m = GPT(GPTConfig(vocab_size=13, block_size=16, n_layer=1, n_head=2, d_model=32, backend=backend))
        x = torch.randint(0, 13, (2, 8))
    loss = m(x, x)
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    assert m.trunk.wte.weight.grad.shape == (13, 32)


def test_backend_is_passed_to_the_ops():
    m = GPT(GPTConfig(vocab_size=13, block_size=16, n_layer=1, n_head=2, d_model=16, backend="cuda"))
    if "cuda" in ro.available_backends():
        pytest.skip("the cuda backend exists here; this checks that naming it reaches the ops")
    with pytest.raises(RuntimeError, match="cuda"):
        m(torch.randint(0, 13, (1, 4)), torch.randint(0, 13, (1, 4)))


def test_generate_checks_block_size():
    with pytest.raises(ValueError, match="block_size"):
        GPT(CFG).generate(torch.zeros(1, 10, dtype=torch.long), torch.tensor([10]), 7)


# ----------------------------------------------------------------- generation with a KV cache ---

def _teacher_forced(m, seq, lens, steps, decode):
    """Logits [steps, B, V] of each decode step when the next token is forced to seq's."""
    from rlhf_ops.train.model import _CachedDecoder, _Recompute
    P = int(lens.max())
    dec = (_CachedDecoder(m, seq[:, :P].clone(), lens, P + steps, decode) if decode
           else _Recompute(m, seq[:, :P].clone(), lens, P + steps))
    out, L, rows = [dec.first_logits()], lens.clone(), torch.arange(seq.shape[0])
    for _ in range(steps - 1):
        out.append(dec.next_logits(seq[rows, L], torch.ones_like(L, dtype=torch.bool)))
        L = L + 1
    return torch.stack(out)


@pytest.mark.parametrize("lens,decode", [([5, 5, 5, 5], "varlen"), ([5, 2, 4, 1], "varlen"),
                                         ([5, 2, 4, 2], "grouped")], ids=["equal", "mixed-varlen", "mixed-grouped"])
def test_kv_cache_decode_matches_full_recompute(lens, decode):
    """Each cached decode step (one query against the cached keys) gives the logits of a forward
    over the whole prefix, and generation with the cache gives the same tokens bit for bit.

    Logits agree to fp64 rounding, not bit for bit: the CPU GEMM's summation order depends on the
    number of rows (measured: Linear(64→192) rows differ in the last bit between M = 5 and M = 25),
    and a decode step multiplies 1 row per sequence where a recompute multiplies all of them."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=4, d_model=32,
                      backend="reference")).double()
    with torch.no_grad():                          # logits of order 1-10, so a wrong key shows
        m.trunk.wte.weight.mul_(20)
    lens = torch.tensor(lens)
    seq = torch.randint(2, 13, (4, 12))
    cached = _teacher_forced(m, seq, lens, 7, decode)
    full = _teacher_forced(m, seq, lens, 7, None)
    torch.testing.assert_close(cached, full, rtol=1e-12, atol=1e-12)
    # and against the plain forward of each row's prefix alone (first and last decode step)
    for t in (1, 6):
        for b in range(4):
            n = int(lens[b]) + t
            torch.testing.assert_close(cached[t, b], m(seq[b:b + 1, :n])[0, -1], rtol=1e-12, atol=1e-12)
    for dtype in (torch.float64, torch.float32):
        md = m.to(dtype)
        for greedy in (True, False):
            a = md.generate(seq[:, :5], lens, 9, greedy=greedy, eos=1, decode=decode,
                            generator=torch.Generator().manual_seed(1))
            b = md.generate(seq[:, :5], lens, 9, greedy=greedy, eos=1, use_cache=False,
                            generator=torch.Generator().manual_seed(1))
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (dtype, greedy)


@pytest.mark.parametrize("decode", ["varlen", "grouped"])
def test_left_padded_generation_matches_unpadded_rows(decode):
    """Left-padded prompts of different lengths in one batch: each row's prompt + response equals
    that row generated alone, unpadded (greedy)."""
    torch.manual_seed(1)
    m = GPT(GPTConfig(vocab_size=13, block_size=20, n_layer=2, n_head=2, d_model=16,
                      backend="reference")).double()
    rows = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12], [2]]
    P = max(map(len, rows))
    left = torch.tensor([[0] * (P - len(r)) + r for r in rows])
    n = torch.tensor([len(r) for r in rows])
    seq, rl = m.generate(left, n, 7, greedy=True, eos=1, pad=0, padding_side="left", decode=decode)
    assert seq.shape == (4, P + 7) and torch.equal(seq[:, :P], left)
    for i, r in enumerate(rows):
        s1, r1 = m.generate(torch.tensor([r]), torch.tensor([len(r)]), 7, greedy=True, eos=1, pad=0)
        assert int(rl[i]) == int(r1[0])
        assert seq[i, P:P + int(rl[i])].tolist() == s1[0, len(r):len(r) + int(r1[0])].tolist()
        assert (seq[i, P + int(rl[i]):] == 0).all()
    # the same rows right-padded give the same responses
    right = torch.tensor([r + [0] * (P - len(r)) for r in rows])
    seq_r, rl_r = m.generate(right, n, 7, greedy=True, eos=1, pad=0, decode=decode)
    assert torch.equal(rl_r, rl)
    for i, r in enumerate(rows):
        assert seq_r[i, len(r):len(r) + int(rl[i])].tolist() == seq[i, P:P + int(rl[i])].tolist()
    with pytest.raises(ValueError, match="padding_side"):
        m.generate(left, n, 3, padding_side="middle")
    with pytest.raises(ValueError, match="decode"):
        m.generate(left, n, 3, decode="fast")


def test_logprobs_from_hidden_states_equal_those_of_the_logits():
    """forward(idx, logprobs_of=tokens): log π(token) and the entropy straight from the hidden
    states (linear_token_logprobs) equal token_logprobs of the logits and −Σ p log p, in float64,
    with their gradients."""
    torch.manual_seed(0)
    m = GPT(CFG).double()
    x, tok = torch.randint(0, 13, (3, 9)), torch.randint(0, 13, (3, 9))
    lp, ent = m(x, logprobs_of=tok, temperature=0.7, entropy=True)
    logits = m(x) / 0.7
    ref_lp = torch.log_softmax(logits, -1).gather(-1, tok[..., None]).squeeze(-1)
    ref_ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(x, logprobs_of=tok, temperature=0.7), lp)
    w = torch.randn(3, 9, dtype=torch.float64)
    g = torch.autograd.grad((lp * w).sum() + ent.sum(), m.trunk.wte.weight)[0]
    g_ref = torch.autograd.grad((ref_lp * w).sum() + ref_ent.sum(), m.trunk.wte.weight)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
