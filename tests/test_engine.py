"""The engine's one optimiser step: accumulation over micro-batches is the mean gradient of the process's share."""
import copy

import pytest
import torch
import torch.nn.functional as F

from cbd_cache.config import TrainCfg
from cbd_cache.models.networks import Network
from cbd_cache.system.runtime import make_runtime
from cbd_cache.train.engine import cosine_schedule, make_optimizer, train_step

from .conftest import smoke_config


def micro_batches(n: int, size: int = 4) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(size, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (size,), generator=g))
            for _ in range(n)]


def ce(model, batch):
    logits, _ = model(batch[0])
    loss = F.cross_entropy(logits, batch[1])
    return loss, {"ce": loss.detach()}


@pytest.mark.parametrize("n", [1, 3])
def test_accumulated_gradient_is_the_mean_of_the_micro_batches(n):
    """float64, so the only difference from the reference is summation order (1e-16); a loss not scaled by
    1/n, or a micro-batch counted twice, is off by a third or more."""
    torch.manual_seed(0)
    net = Network("resnet8", 3, 10, 20.0).double().train()
    batches = micro_batches(n)
    reference, losses = [], []
    for batch in batches:   # each micro-batch's loss and gradient alone, from the same weights
        alone = copy.deepcopy(net)
        loss = ce(alone, batch)[0]
        loss.backward()
        losses.append(loss.detach())
        reference.append({k: p.grad for k, p in alone.named_parameters()})
    t = TrainCfg(lr=1.0, momentum=0.0, weight_decay=0.0)
    optimizer = make_optimizer(net, t)
    loss, stats = train_step(net, batches, ce, optimizer, cosine_schedule(optimizer, 10),
                             make_runtime(smoke_config().pipeline))
    for k, p in net.named_parameters():
        expected = sum(r[k] for r in reference) / n
        torch.testing.assert_close(p.grad, expected, rtol=1e-9, atol=1e-12, msg=k)
    assert torch.isclose(loss, sum(losses) / n, rtol=1e-12) and torch.isclose(stats["ce"], loss)
