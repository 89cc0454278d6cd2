import numpy as np
import pytest
import torch

from celeba_app.model import make_head
from celeba_app.task import bce_per_row, group_balance_weights, predict, train_head


def data(n=200, seed=0, d=1280):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] + 0.3 * torch.randn(n, generator=g) > 0).long()
    return x, y


def distance(a, b):
    return sum((p - q).pow(2).sum() for p, q in zip(a.parameters(), b.parameters())).sqrt().item()


def test_training_learns_a_separable_signal():
    x, y = data()
    head = make_head(1280, seed=0)
    res = train_head(head, x, y, epochs=20, lr=0.01, batch_size=32, seed=0)
    acc = ((predict(head, x) >= 0.5) == y.numpy()).mean()
    assert acc > 0.95 and res["steps"] == 20 * 7


def test_proximal_term_keeps_the_head_near_the_received_one():
    x, y = data()
    start = make_head(1280, seed=0)
    free, prox = make_head(1280, seed=0), make_head(1280, seed=0)
    kw = dict(epochs=5, lr=0.01, batch_size=32, seed=1)
    train_head(free, x, y, **kw)
    train_head(prox, x, y, proximal_mu=10.0, **kw)
    assert distance(prox, start) < 0.5 * distance(free, start)


def test_weight_decay_shrinks_the_weights():
    x, y = data()
    plain, decayed = make_head(1280, seed=0), make_head(1280, seed=0)
    kw = dict(epochs=10, lr=0.01, batch_size=32, seed=1)
    train_head(plain, x, y, **kw)
    train_head(decayed, x, y, weight_decay=5.0, **kw)
    assert decayed[1].weight.norm() < 0.8 * plain[1].weight.norm()


def test_group_balance_weights_give_each_group_equal_total_weight():
    male = np.array([1, 1, 1, 1, 1, 1, 0, 0])
    young = np.array([1, 1, 1, 0, 0, 0, 1, 1])
    w = group_balance_weights({"Male": male, "Young": young}, ("Male", "Young")).numpy()
    assert w.mean() == np.float32(1.0) or abs(w.mean() - 1) < 1e-6
    totals = {key: w[(male == key[0]) & (young == key[1])].sum() for key in ((1, 1), (1, 0), (0, 1))}
    assert max(totals.values()) - min(totals.values()) < 1e-5
    assert (group_balance_weights({"Male": male}, ()).numpy() == 1).all()


def test_group_balanced_loss_gives_a_small_group_equal_say():
    # Features carry no signal: the head can only learn a bias. 270 rows of group 1 are all
    # positive, 30 rows of group 0 all negative. Plain BCE learns the base rate (0.9);
    # with equal weight per group the optimum is 0.5.
    x = torch.zeros(300, 1280)
    y = torch.cat([torch.ones(270), torch.zeros(30)]).long()
    attrs = {"Male": np.r_[np.ones(270), np.zeros(30)].astype(int)}
    plain, balanced = make_head(1280, seed=0), make_head(1280, seed=0)
    kw = dict(epochs=300, lr=0.05, batch_size=300, seed=1)
    train_head(plain, x, y, **kw)
    train_head(balanced, x, y, sample_weight=group_balance_weights(attrs, ("Male",)), **kw)
    assert abs(predict(plain, x[:1])[0] - 0.9) < 0.02
    assert abs(predict(balanced, x[:1])[0] - 0.5) < 0.02


def test_bce_per_row_matches_torch():
    p = np.array([0.1, 0.7, 0.999, 1e-9])
    y = np.array([0, 1, 0, 1])
    ref = torch.nn.functional.binary_cross_entropy(torch.tensor(p), torch.tensor(y, dtype=torch.float64),
                                                   reduction="none").numpy()
    assert np.allclose(bce_per_row(p, y), ref)


def test_adamw_is_torchs_adamw():
    """task.AdamW (no torch._dynamo import per process) follows torch.optim.AdamW exactly."""
    from celeba_app.task import AdamW

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1280, generator=gen), (torch.rand(64, generator=gen) > 0.5).float()
    ours, theirs = make_head(1280, seed=3), make_head(1280, seed=3)
    opts = [AdamW(list(ours.parameters()), lr=0.01, weight_decay=0.05),
            torch.optim.AdamW(theirs.parameters(), lr=0.01, weight_decay=0.05)]
    for _ in range(25):
        for head, opt in zip((ours, theirs), opts):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(head(x).squeeze(-1), y).backward()
            opt.step()
    for k, v in theirs.state_dict().items():
        assert torch.allclose(ours.state_dict()[k], v, atol=1e-7, rtol=0), k
    assert not torch.equal(ours.state_dict()["1.weight"], make_head(1280, seed=3).state_dict()["1.weight"])


class _AutogradLinear(torch.nn.Linear):
    """A Linear that task._is_logistic_head does not recognise: its head trains by autograd."""


@pytest.mark.parametrize("dropout, mu, decay, weighted, views, width", [
    (0.0, 0.0, 0.0, False, 1, 1280), (0.3, 0.0, 0.0, False, 1, 1280), (0.0, 2.0, 0.0, False, 1, 1280),
    (0.0, 0.0, 0.05, True, 1, 1280), (0.2, 1.0, 0.05, True, 2, 1280),
    (0.2, 1.0, 0.05, True, 2, 32), (0.2, 1.0, 0.05, True, 2, 4704), (0.0, 0.0, 0.0, False, 1, 864)])
def test_the_closed_form_step_trains_the_head_autograd_trains(dropout, mu, decay, weighted, views, width):
    """make_head's head trains by task._logistic_step (no autograd); any other head by
    autograd. Same data, seed and options: the same head, with every option that changes
    the gradient (dropout, FedProx's mu, weight decay, per-row weights, cached views), for a
    head on any number of features (feature-layer, feature-pool)."""
    x, y = data(n=150, d=width)
    x = torch.stack([x, -x]) if views == 2 else x
    fast = make_head(width, dropout, seed=4)
    slow = torch.nn.Sequential(torch.nn.Dropout(dropout), _AutogradLinear(width, 1))
    slow.load_state_dict(fast.state_dict())
    weight = torch.linspace(0.5, 1.5, 150) if weighted else None
    kw = dict(epochs=3, lr=0.01, batch_size=32, seed=7, proximal_mu=mu, weight_decay=decay, sample_weight=weight)
    torch.manual_seed(11)  # dropout's masks: the same draws on both paths
    res_fast = train_head(fast, x, y, **kw)
    torch.manual_seed(11)
    res_slow = train_head(slow, x, y, **kw)
    assert res_fast["steps"] == res_slow["steps"] == 15
    assert abs(res_fast["loss"] - res_slow["loss"]) < 1e-6
    for k, v in slow.state_dict().items():
        assert torch.allclose(fast.state_dict()[k], v, atol=1e-6, rtol=0), k
    assert distance(fast, make_head(width, dropout, seed=4)) > 0.01  # it trained


def test_the_head_trains_and_predicts_on_one_thread_and_the_thread_count_comes_back(monkeypatch):
    """Several processes sharing the cores must not each spin torch's full thread pool on the
    head's small matmuls (task.one_thread); the backbone keeps every thread afterwards."""
    import celeba_app.task as task

    seen = []
    real = task._train_head
    monkeypatch.setattr(task, "_train_head", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    torch.set_num_threads(2)
    head = task.nn.Sequential(task.nn.Dropout(0.0), task.nn.Linear(4, 1))
    x, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    task.train_head(head, x, y, epochs=1, lr=0.01, batch_size=8, seed=0)
    assert seen == [1] and torch.get_num_threads() == 2
    monkeypatch.setattr(task.torch, "sigmoid", lambda t: seen.append(torch.get_num_threads()) or t.sigmoid())
    task.predict(head, x)
    assert seen == [1, 1] and torch.get_num_threads() == 2


def test_the_conv1x1_head_trains_by_autograd_with_every_option():
    """head='conv1x1' is no logistic regression: train_head takes autograd steps, with FedProx's
    term, weight decay, row weights and two views, and the head learns."""
    from celeba_app import task

    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 16 * 9, generator=g)
    y = (x[:, 0] > 0).long()
    head = make_head(16 * 9, 0.1, seed=0, kind="conv1x1", channels=16)
    assert not task._is_logistic_head(head)
    start = [p.detach().clone() for p in head.parameters()]
    res = train_head(head, torch.stack([x, x]), y, epochs=20, lr=0.01, batch_size=32, seed=1, proximal_mu=0.1,
                     weight_decay=0.01, sample_weight=torch.linspace(0.5, 1.5, 120))
    assert res["steps"] == 80 and all(not torch.equal(a, b) for a, b in zip(start, head.parameters()))
    assert ((torch.from_numpy(predict(head, x)) > 0.5).long() == y).float().mean() > 0.8
