"""The benchmark's peer methods compute the same loss and gradients as the naive materializing
OPO (so their times compare like with like), and the input kinds look as documented."""
import math

import pytest
import torch

from bench.cases import Shape, Unavailable, get_method, make_inputs, naive_opo

SHAPE = Shape(2, 24, 32, 300, "float32")


def _run(name, x):
    try:
        step = get_method(name).build(x)
    except Unavailable as e:
        pytest.skip(str(e))
    x.zero_grad()
    loss = step()
    return loss, x.hidden.grad.clone(), x.weight.grad.clone()


@pytest.mark.parametrize("name", ["trl_chunked_opo", "torch_linear_ce_opo"])
@pytest.mark.parametrize("kind", ["zipf", "flat"])
def test_peer_matches_naive(name, kind):
    x = make_inputs(SHAPE, kind, "cpu", seed=3)
    x.zero_grad()
    ref = naive_opo(x.hidden, x.weight, x.targets, x.old_logps, x.advantages)
    ref.backward()
    rh, rw = x.hidden.grad.clone(), x.weight.grad.clone()
    loss, gh, gw = _run(name, x)
    # fp32 throughout: log-probs differ by summation order only (~1e-6 relative of |logits|);
    # the loss and gradients are O(1) sums of them.
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)


def test_zipf_inputs_share_a_prior():
    x = make_inputs(Shape(4, 64, 32, 2000, "float32"), "zipf", "cpu", seed=0)
    assert 1.0 <= x.entropy <= 2.0
    z = (x.hidden.detach().reshape(-1, 32) @ x.weight.detach().T).float()
    p = torch.softmax(z, -1).mean(0)
    # The prior's rank order shows in the batch-mean softmax: the mass of the 1% most likely
    # tokens (by the shared prior) far exceeds 1%, unlike for peaked inputs without a prior.
    prior = x.weight.detach()[:, 0].float()
    top = prior.topk(20).indices
    assert p[top].sum() > 0.2
    peaked = make_inputs(Shape(4, 64, 32, 2000, "float32"), "peaked", "cpu", seed=0)
    zp = (peaked.hidden.detach().reshape(-1, 32) @ peaked.weight.detach().T).float()
    assert torch.softmax(zp, -1).mean(0).topk(20).values.sum() < p[top].sum()
    with pytest.raises(ValueError, match="kind"):
        make_inputs(SHAPE, "zipff", "cpu")
    assert math.isfinite(x.target_logp)
