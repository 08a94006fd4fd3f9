import math

import torch

from cbd_cache.losses import cbd_loss, normalize_per_teacher


def test_cbd_loss_matches_hand_computation():
    # two samples, three classes; e and t in R^2
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 1])
    e = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    alpha, beta = 0.4, 100.0
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    ce1 = -math.log(math.exp(1) / (1 + math.exp(1) + math.exp(3)))
    ce = (ce0 + ce1) / 2
    distill = ((1 - 0.0) + (1 - 1.0)) / 2          # cos = 0 for the first pair, 1 for the second
    expected = (1 - alpha) * ce + alpha * beta * distill
    loss, parts = cbd_loss(logits, labels, e, t, alpha, beta)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(parts["ce"].item(), ce, rel_tol=1e-6)
    assert math.isclose(parts["distill"].item(), distill, abs_tol=1e-7)


def test_alpha_zero_is_cross_entropy_and_alpha_one_is_distillation():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    e, t = torch.randn(8, 6), torch.randn(8, 6)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    cos = torch.nn.functional.cosine_similarity(e, t).mean()
    assert torch.isclose(cbd_loss(logits, labels, e, t, 0.0, 100.0)[0], ce)
    assert torch.isclose(cbd_loss(logits, labels, e, t, 1.0, 10.0)[0], 10 * (1 - cos), atol=1e-5)


def test_each_teacher_is_normalised_separately():
    t = torch.tensor([[3.0, 4.0, 0.0, 10.0, 0.0]])          # two teachers: d = 3, then d = 2
    out = normalize_per_teacher(t, [3, 2])
    assert torch.allclose(out, torch.tensor([[0.6, 0.8, 0.0, 1.0, 0.0]]))
    # the concatenation of K unit vectors has norm sqrt(K): each teacher weighs the same in the cosine
    assert math.isclose(out.norm().item(), math.sqrt(2), rel_tol=1e-6)
