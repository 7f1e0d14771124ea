"""Value models: positions, copies, save / load, the shared-trunk forward."""
import pytest
import torch

from grpo_fast import demo
from grpo_fast.model.critic import critic_values
from grpo_fast.model import forward_hidden
from steps import make_rollout
from grpo_fast.model.critic import ValueHead, ValueModel, build_value_model, hidden_size_of, trunk_of


@pytest.fixture(scope="module")
def tok():
    return demo.build_tokenizer()


@pytest.fixture()
def policy(tok):
    return demo.build_model(tok, hidden_size=32, num_layers=1, seed=3).eval()


def sample_batch(tok, T=5):
    """Left-padded prompts of different lengths and right-padded completions (as the rollout makes)."""
    enc = tok(["1+2=", "13+4=", "7="], return_tensors="pt", padding=True, padding_side="left")
    g = torch.Generator().manual_seed(0)
    comp = torch.randint(4, len(tok), (3, T), generator=g)
    cmask = torch.ones_like(comp)
    cmask[1, 3:] = 0
    comp[1, 3:] = tok.pad_token_id
    return make_rollout(enc["input_ids"], enc["attention_mask"], comp, cmask)


def _perturb_head(vm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vm.head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_fresh_critic_copies_the_policy_trunk_and_predicts_zero(policy, tok):
    vm = ValueModel.from_causal_lm(policy)
    trunk = trunk_of(policy)
    for (n1, a), (n2, b) in zip(trunk.named_parameters(), vm.trunk.named_parameters()):
        assert n1 == n2 and torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    batch = sample_batch(tok)
    with torch.no_grad():
        v = critic_values(vm, batch, slice(None))
    assert v.shape == (3, 5) and v.dtype == torch.float32 and (v == 0).all()
    assert hidden_size_of(policy.config) == 32
    # training the copy leaves the policy alone
    with torch.no_grad():
        next(vm.trunk.parameters()).add_(1.0)
    assert not torch.equal(next(vm.trunk.parameters()), next(trunk.parameters()))


def test_value_positions_are_the_states_before_each_token(policy, tok):
    """Value of completion token t = head(hidden state at the position that predicts token t)."""
    vm = ValueModel.from_causal_lm(policy)
    _perturb_head(vm)
    batch = sample_batch(tok)
    with torch.no_grad():
        v = critic_values(vm, batch, slice(None))                               # (3, 5)
        P = batch.prompt_ids.shape[1]
        for i in range(3):
            # unpadded sequence, no masks: the reference forward
            ids = torch.cat([batch.prompt_ids[i][batch.prompt_attention[i].bool()], batch.completion_ids[i]])
            h = vm.trunk(input_ids=ids[None]).last_hidden_state[0]            # (L, H)
            p = int(batch.prompt_attention[i].sum())
            n = int(batch.completion_attention[i].sum())
            ref = vm.head(h[p - 1:p - 1 + n])
            torch.testing.assert_close(v[i, :n], ref, atol=1e-5, rtol=1e-5)
        assert P >= 1


def test_shared_trunk_forward_gives_logits_and_hidden(policy, tok):
    batch = sample_batch(tok)
    head = ValueHead(hidden_size_of(policy.config))
    with torch.no_grad():
        logits, hidden = forward_hidden(policy, batch, slice(None))
        none, hidden_only = forward_hidden(policy, batch, slice(None), logits=False)
        assert none is None
        torch.testing.assert_close(hidden, hidden_only)
        torch.testing.assert_close(policy.lm_head(hidden), logits, atol=1e-5, rtol=1e-5)
        assert head(hidden).shape == (3, 5)


def test_save_and_load_roundtrip(policy, tok, tmp_path):
    vm = ValueModel.from_causal_lm(policy)
    _perturb_head(vm)
    vm.save_pretrained(str(tmp_path / "critic"))
    again = ValueModel.from_pretrained(str(tmp_path / "critic"))
    batch = sample_batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(critic_values(again, batch, slice(None)), critic_values(vm, batch, slice(None)),
                                   atol=0, rtol=0)


def test_build_from_a_causal_lm_directory_and_instances(policy, tok, tmp_path):
    policy.save_pretrained(str(tmp_path / "lm"))
    vm = build_value_model(str(tmp_path / "lm"), policy)
    for a, b in zip(trunk_of(policy).parameters(), vm.trunk.parameters()):
        assert torch.equal(a, b)
    assert (vm.head.summary.weight == 0).all()
    assert build_value_model(vm, policy) is vm
    other = demo.build_model(tok, hidden_size=16, num_layers=1, seed=9)
    assert build_value_model(other, policy).head.summary.in_features == 16
    with pytest.raises(TypeError, match="value_model"):
        build_value_model(3, policy)


def test_peft_policy_gives_a_plain_critic(policy, tok):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    wrapped = peft.get_peft_model(demo.build_model(tok, hidden_size=32, num_layers=1, seed=3), lora)
    vm = ValueModel.from_causal_lm(wrapped)
    names = [n for n, _ in vm.trunk.named_parameters()]
    assert not any("lora" in n for n in names)
    assert all(p.requires_grad for p in vm.trunk.parameters())
    for a, b in zip(trunk_of(policy).parameters(), vm.trunk.parameters()):
        assert torch.equal(a, b)  # LoRA starts at zero: the merged copy is the base model
