"""Figure 4's claims on the binary-logit toy (bench/saturation.py), checked against float64
closed forms written here. Gradients under test come from autograd through opo_kernels."""
import math

import pytest
import torch

pytest.importorskip("opo_kernels")
from bench import saturation  # noqa: E402

ALPHA = 0.4


def grad(name, z, **kw):
    zt = torch.tensor(float(z), dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(saturation.toy_loss(name, zt, **kw), zt)
    return g.item()


def omega_pair():
    """Escort weights of the group [+1, -1] (contract: z-score of exp((1-alpha) A / tau))."""
    a = torch.tensor([1.0, -1.0], dtype=torch.float64)
    w = torch.exp((1 - ALPHA) * a - ((1 - ALPHA) * a).max())
    return ((w - w.mean()) / (w.std(unbiased=False) + 1e-6)).tolist()


def z_of(p):
    return math.log(p / (1 - p))


@pytest.mark.parametrize("mu", [1.0, 2.0])
def test_opo_on_logit_margin_is_linear_and_order_one(mu):
    o1, o2 = omega_pair()
    zs = [-6.0 + 0.5 * i for i in range(33)]  # p from 0.0025 to 0.99995
    got = [grad("opo", z, mu=mu) for z in zs]
    # L = mean over the pair of -omega_i v_i + mu/2 v_i^2 with v = (z, -z).
    ref = [0.5 * ((-o1 + mu * z) - (-o2 - mu * z)) for z in zs]
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-5)
    slopes = [(b - a) / 0.5 for a, b in zip(got, got[1:])]
    assert slopes == pytest.approx([mu] * len(slopes), rel=1e-4)  # constant curvature mu
    z_star = (o1 - o2) / (2 * mu)
    for z, g in zip(zs, got):
        # Proportional to the distance from equilibrium: O(1) away from it, never saturating.
        assert abs(g) == pytest.approx(mu * abs(z - z_star), rel=1e-4, abs=1e-5)
    assert abs(got[-1]) > 8 * mu  # at p = 0.99995 the gradient is the largest, not vanishing


@pytest.mark.parametrize("name,p_zero", [("grpo", 0.6), ("dapo", 0.64), ("gspo", 0.5002)])
def test_clipped_losses_are_exactly_zero_outside_their_window(name, p_zero):
    for p in (p_zero + 1e-3, 0.7, 0.9, 0.99, 0.9999):
        assert grad(name, z_of(p)) == 0.0
    # and the mirror side, where the ratios moved against the advantages, is not clipped
    for p in (0.3, 0.1):
        assert grad(name, z_of(p)) != 0.0


def test_clipped_losses_inside_the_window_match_the_closed_form():
    # Both ratios r = 2p, 2(1-p) inside [1-eps, 1+eps]: L = mean(-A r) = 1 - 2p, dL/dz = -2p(1-p).
    for name, p in (("grpo", 0.55), ("dapo", 0.55), ("gspo", 0.50005)):
        assert grad(name, z_of(p)) == pytest.approx(-2 * p * (1 - p), rel=1e-4)
    # DAPO at p = 0.62: ybar's ratio 0.76 < 0.8 is clipped, y's 1.24 < 1.28 is not.
    p = 0.62
    assert grad("dapo", z_of(p)) == pytest.approx(-p * (1 - p), rel=1e-4)


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_dpo_decays_exponentially(beta):
    zs = [0.0, 2.0, 4.0, 8.0, 12.0]
    got = [grad("dpo", z, dpo_beta=beta) for z in zs]
    ref = [-beta / (1 + math.exp(beta * z)) for z in zs]  # d/dz -log sigmoid(beta z)
    assert got == pytest.approx(ref, rel=1e-9)
    # log|g| falls with slope -beta once beta z >> 1
    assert (math.log(-got[-1]) - math.log(-got[-2])) / 4 == pytest.approx(-beta, rel=2e-2)


def test_through_log_sigmoid_the_sampled_actions_term_decays():
    # The parametrization caveat: chi^2 on log sigma(z) of the sampled action carries 1 - p.
    o1, _ = omega_pair()
    for p in (0.9, 0.99, 0.9999):
        z = z_of(p)
        v = math.log(p) - math.log(0.5)
        ref = 0.5 * (-o1 + v) * (1 - p)
        assert grad("opo_logp_sampled", z) == pytest.approx(ref, rel=1e-4, abs=1e-9)
    assert abs(grad("opo_logp_sampled", z_of(0.9999))) < 1e-3


def test_plot_writes_png(tmp_path):
    out = tmp_path / "fig4.png"
    res = saturation.plot(out, n=41)
    assert out.stat().st_size > 10_000
    assert set(saturation.CURVES) <= set(res)
