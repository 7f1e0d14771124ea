"""TRPO's building blocks: conjugate gradient, Fisher-vector products, the constrained step."""
from __future__ import annotations

import torch

from grpo_fast.rl.natural_gradient import (
    conjugate_gradient, fisher_vector_product, flat_grad, get_flat, set_flat, trpo_step,
)


def _policy(seed=0, V=11, H=6, N=20):
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, H), torch.nn.Tanh(), torch.nn.Linear(H, V)).double()
    for p in net.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    acts = torch.randint(0, V, (N,), generator=g)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    return net, x, acts, adv


def _fns(net, x, acts, adv):
    with torch.no_grad():
        old_logsm = torch.log_softmax(net(x), -1)
    old_lp = old_logsm.gather(-1, acts[:, None])[:, 0]

    def kl_fn():  # mean KL(old || new) over the full distribution
        new_logsm = torch.log_softmax(net(x), -1)
        return (old_logsm.exp() * (old_logsm - new_logsm)).sum(-1).mean()

    def surrogate_fn():
        lp = torch.log_softmax(net(x), -1).gather(-1, acts[:, None])[:, 0]
        return (torch.exp(lp - old_lp) * adv).mean()

    return kl_fn, surrogate_fn


def test_conjugate_gradient_solves_spd_system():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(12, 12, generator=g, dtype=torch.float64)
    A = M @ M.T + 0.5 * torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: A @ v, b, iters=50)
    assert torch.allclose(A @ x, b, atol=1e-8)


def test_fisher_vector_product_matches_finite_differences():
    net, x, acts, adv = _policy()
    params = list(net.parameters())
    kl_fn, _ = _fns(net, x, acts, adv)
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fv = fisher_vector_product(kl_fn, params, damping=0.0)(v)
    theta = get_flat(params)
    eps = 1e-5

    def grad_at(t):
        set_flat(params, t)
        return flat_grad(kl_fn(), params)

    fd = (grad_at(theta + eps * v) - grad_at(theta - eps * v)) / (2 * eps)
    set_flat(params, theta)
    assert torch.allclose(fv, fd, rtol=1e-4, atol=1e-7), (fv - fd).abs().max()
    # the Fisher matrix is positive semi-definite
    assert v.dot(fv).item() >= -1e-10


def test_fisher_vector_product_on_tiny_llama_lora_like_subset():
    """Products over a subset of parameters (as with LoRA) match finite differences."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).double()
    ids = torch.randint(0, 23, (2, 6))
    trainable = [model.model.layers[0].self_attn.q_proj.weight, model.lm_head.weight]
    with torch.no_grad():
        old = torch.log_softmax(model(ids).logits, -1)

    def kl_fn():
        new = torch.log_softmax(model(ids).logits, -1)
        return (old.exp() * (old - new)).sum(-1).mean()

    v = torch.randn(sum(p.numel() for p in trainable), dtype=torch.float64)
    fv = fisher_vector_product(kl_fn, trainable, damping=0.0)(v)
    theta = get_flat(trainable)
    eps = 1e-5

    def grad_at(t):
        set_flat(trainable, t)
        return flat_grad(kl_fn(), trainable)

    fd = (grad_at(theta + eps * v) - grad_at(theta - eps * v)) / (2 * eps)
    set_flat(trainable, theta)
    assert (fv - fd).norm() <= 1e-4 * fd.norm(), ((fv - fd).norm(), fd.norm())


def test_trpo_step_respects_kl_and_improves_surrogate():
    for seed in range(5):
        net, x, acts, adv = _policy(seed)
        params = list(net.parameters())
        kl_fn, surrogate_fn = _fns(net, x, acts, adv)
        before = surrogate_fn().item()
        res = trpo_step(params, surrogate_fn, kl_fn, max_kl=0.01)
        assert res.accepted
        kl_now = kl_fn().item()
        assert kl_now <= 0.01 * (1 + 1e-9)
        assert abs(kl_now - res.kl) < 1e-12
        assert surrogate_fn().item() > before
        assert res.surrogate_gain > 0 and 1 <= res.line_search_steps <= 10


def test_rejected_step_leaves_parameters_bit_identical():
    net, x, acts, adv = _policy(3)
    params = list(net.parameters())
    kl_fn, surrogate_fn = _fns(net, x, acts, adv)
    before = [p.detach().clone() for p in params]
    # a surrogate that can never improve along any step: every line-search step is rejected
    calls = {"n": 0}

    def stubborn():
        calls["n"] += 1
        s = surrogate_fn()
        return s if calls["n"] == 1 else s.detach() * 0 - 1e9

    res = trpo_step(params, stubborn, kl_fn, max_kl=0.01, backtrack_iters=4)
    assert not res.accepted and res.line_search_steps == 4
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_zero_advantages_take_no_step():
    net, x, acts, adv = _policy(4)
    params = list(net.parameters())
    kl_fn, surrogate_fn = _fns(net, x, acts, torch.zeros_like(adv))
    before = get_flat(params)
    res = trpo_step(params, surrogate_fn, kl_fn, max_kl=0.01)
    assert not res.accepted
    assert torch.equal(get_flat(params), before)


# ----------------------------------------------------------------------------- data parallel (reduce)
def test_identity_reduce_is_bit_identical_to_none():
    """reduce is only an average over ranks: with one 'rank' (identity) nothing changes, to the bit."""
    for seed in (0, 3):
        results, weights = [], []
        for reduce in (None, lambda t: t, lambda t: None):  # returning the average, or averaging in place
            net, x, acts, adv = _policy(seed)
            params = list(net.parameters())
            kl_fn, surrogate_fn = _fns(net, x, acts, adv)
            results.append(trpo_step(params, surrogate_fn, kl_fn, max_kl=0.01, reduce=reduce))
            weights.append(get_flat(params))
        assert results[0].accepted
        for r, w in zip(results[1:], weights[1:]):
            assert r == results[0]
            assert torch.equal(w, weights[0])


class _VirtualRanks:
    """Averages a tensor over n threads, each a 'rank' (the same summation order on every thread)."""

    def __init__(self, n):
        import threading

        self.n, self.slots = n, [None] * n
        self.barrier = threading.Barrier(n, timeout=60)

    def reducer(self, rank):
        def reduce(t):
            self.slots[rank] = t.detach().clone()
            self.barrier.wait()
            avg = sum(self.slots) / self.n
            self.barrier.wait()  # nobody overwrites a slot before every rank has read it
            return avg

        return reduce


def _run_ranks(fn, n=2):
    import threading

    out, errors = [None] * n, []

    def target(r):
        try:
            out[r] = fn(r)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return out


def test_two_virtual_ranks_equal_the_whole_batch():
    """Two threads, each with its own copy of the policy and half the batch (its mean over its half is
    its share: the average of the halves' means is the whole batch's mean), reduce = the average over
    the threads: the same step as one process on the whole batch, and identical weights on both."""
    for seed in range(3):
        net, x, acts, adv = _policy(seed)
        kl_fn, surrogate_fn = _fns(net, x, acts, adv)
        params = list(net.parameters())
        theta0 = get_flat(params)
        whole = trpo_step(params, surrogate_fn, kl_fn, max_kl=0.01)
        want = get_flat(params)
        ranks = _VirtualRanks(2)
        half = len(x) // 2

        def rank_step(r):
            net_r, _, _, _ = _policy(seed)
            rows = slice(r * half, (r + 1) * half)
            kl_r, surr_r = _fns(net_r, x[rows], acts[rows], adv[rows])
            p = list(net_r.parameters())
            res = trpo_step(p, surr_r, kl_r, max_kl=0.01, reduce=ranks.reducer(r))
            return res, get_flat(p)

        (res0, w0), (res1, w1) = _run_ranks(rank_step)
        assert whole.accepted and res0.accepted and res1.accepted
        assert res0 == res1 and torch.equal(w0, w1)  # identical decisions and weights on the ranks
        assert res0.line_search_steps == whole.line_search_steps
        assert abs(res0.kl - whole.kl) <= 1e-10 and abs(res0.surrogate_gain - whole.surrogate_gain) <= 1e-10
        assert torch.allclose(w0, want, rtol=0, atol=1e-10) and not torch.equal(want, theta0)


def test_rejected_step_restores_every_virtual_rank_bit_identically():
    ranks = _VirtualRanks(2)

    def rank_step(r):
        net, x, acts, adv = _policy(5)
        rows = slice(r * 10, (r + 1) * 10)
        kl_fn, surrogate_fn = _fns(net, x[rows], acts[rows], adv[rows])
        params = list(net.parameters())
        before = get_flat(params)
        calls = {"n": 0}

        def stubborn():  # never improves after the first call: every line-search step is rejected
            calls["n"] += 1
            s = surrogate_fn()
            return s if calls["n"] == 1 else s.detach() * 0 - 1e9

        res = trpo_step(params, stubborn, kl_fn, max_kl=0.01, backtrack_iters=3, reduce=ranks.reducer(r))
        return res, torch.equal(get_flat(params), before)

    for res, restored in _run_ranks(rank_step):
        assert not res.accepted and res.line_search_steps == 3 and restored
