import math

import torch

from cbd_cache.models.losses import cbd_loss, normalize_per_teacher


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


def test_logit_kd_matches_hand_computation_and_averages_teachers():
    from cbd_cache.models.losses import logit_kd

    z = torch.tensor([[1.0, 0.0]])
    t1, t2 = torch.tensor([[0.0, 2.0]]), torch.tensor([[2.0, 0.0]])
    T = 2.0
    p = torch.softmax(torch.cat([t1, t2]) / T, dim=1).mean(0)            # the two teachers' mean distribution
    q = torch.softmax(z / T, dim=1)[0]
    expected = T ** 2 * float((p * (p / q).log()).sum())
    assert math.isclose(logit_kd(z, torch.cat([t1, t2], dim=1), T).item(), expected, rel_tol=1e-5)
    # a student that matches its one teacher has no logit loss
    assert logit_kd(t1, t1, T).item() < 1e-6


def test_distillation_loss_variants():
    from cbd_cache.models.losses import distillation_loss, logit_kd

    torch.manual_seed(0)
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    e, t, zt = torch.randn(8, 6), torch.randn(8, 6), torch.randn(8, 10)   # two teachers' logits
    ce = torch.nn.functional.cross_entropy(logits, labels)
    cos = 1 - torch.nn.functional.cosine_similarity(e, t).mean()
    kd = logit_kd(logits, zt, 5.0)
    feature, _ = distillation_loss(logits, labels, e, t, None, 0.4, 100.0, 5.0, "feature")
    assert torch.isclose(feature, cbd_loss(logits, labels, e, t, 0.4, 100.0)[0])
    logit, parts = distillation_loss(logits, labels, e, None, zt, 0.4, 100.0, 5.0, "logit")
    assert torch.isclose(logit, 0.6 * ce + 0.4 * kd) and set(parts) == {"ce", "kd"}
    hybrid, _ = distillation_loss(logits, labels, e, t, zt, 0.4, 100.0, 5.0, "hybrid")
    assert torch.isclose(hybrid, 0.6 * ce + 0.4 * (100.0 * cos + kd), rtol=1e-5)
