"""The paper's Figure 4: gradient saturation on a binary-logit toy.

``python -m bench.saturation --out FILE.png``

The toy policy has two actions: ``y`` with probability ``p = sigmoid(z)`` and ``ybar`` with
``1 - p``; the anchor / reference is ``z_ref = 0`` (p_ref = 1/2). The group holds both actions,
``y`` with advantage +1 and ``ybar`` with advantage -1 (the z-scored advantages of a group of two
with rewards 1 and 0). For each loss we take ``|dL/dz|`` by autograd through the project's own
loss functions (``opo_kernels.policy_loss`` on per-token log-probs; SFT and DPO written here,
SFT = -log p, DPO = -log sigmoid(beta * margin)), never from hand-written derivatives.

Which coordinate each loss acts on matters, and the figure says so:

- SFT, GRPO, DAPO, GSPO act on the log-probs ``log sigmoid(+-z)`` (the clipped losses on the
  probability ratio ``r = p / p_ref``). Their gradients carry the factor ``d log p / dz = 1 - p``
  and the clipped ones are exactly zero once ``r`` leaves the clip window in the direction the
  advantage pushes (exact zeros here, drawn at ``ZERO_FLOOR`` on the log panel; the paper
  speaks of a drop "to machine epsilon").
- DPO's margin ``(log p - log p_ref) - (log(1-p) - log(1-p_ref))`` equals ``z - z_ref``
  exactly, so DPO acts on the logit margin; its gradient ``beta * sigmoid(-beta z)`` decays
  exponentially in z all the same.
- OPO, as the paper's panel draws it (linear growth, O(1) everywhere), is the chi^2 loss acting
  on the logit margin: ``v = Delta = +-(z - z_ref)``; its gradient is ``-omega + mu (z - z_ref)``
  (averaged over the pair), linear in the distance from the equilibrium ``z* = 1 / mu``. That
  claim holds in this parametrization only. Through ``log sigmoid(z)``, as an LM computes it,
  the sampled action's own term carries the factor ``1 - p`` and decays like SFT's (dotted
  line); with both actions in the group (dashed line) the gradient does not vanish, because
  ``log(1 - p) - log(1/2) -> -z`` makes the ybar term's chi^2 penalty grow linearly in z: that
  part is the restoring force towards the anchor, not a driving force that survives confidence.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

Z_REF = 0.0
ZERO_FLOOR = 1e-17
LOG_P_REF = math.log(0.5)
ADV = (1.0, -1.0)

# name -> (label, style, coordinate it acts on)
CURVES = {
    "sft": ("SFT", dict(color="tab:gray"), "log p"),
    "dpo": ("DPO", dict(color="tab:purple"), "logit margin z - z_ref"),
    "grpo": ("GRPO", dict(color="tab:blue"), "ratio p / p_ref"),
    "dapo": ("DAPO", dict(color="tab:orange"), "ratio p / p_ref"),
    "gspo": ("GSPO", dict(color="tab:red"), "sequence ratio p / p_ref"),
    "opo": ("OPO (chi^2 on logit margin)", dict(color="tab:green", lw=2.5),
            "logit margin z - z_ref"),
    "opo_logp_pair": ("OPO (chi^2 on log sigma, both actions)",
                      dict(color="tab:green", ls="--"), "log-ratio log p - log p_ref"),
    "opo_logp_sampled": ("OPO (chi^2 on log sigma, sampled action's term)",
                         dict(color="tab:green", ls=":"), "log-ratio log p - log p_ref"),
}


def _pair_logps(z: torch.Tensor, detach_ybar: bool = False) -> torch.Tensor:
    """(2, 1) log-probs of [y, ybar]: one one-token sequence per action."""
    lb = torch.nn.functional.logsigmoid(-z)
    return torch.stack([torch.nn.functional.logsigmoid(z), lb.detach() if detach_ybar else lb]
                       ).view(2, 1)


def toy_loss(name: str, z: torch.Tensor, *, dpo_beta: float = 0.5, mu: float = 1.0,
             alpha: float = 0.4) -> torch.Tensor:
    """Loss of the binary toy as a function of the 0-d logit tensor ``z`` (float64)."""
    from opo_kernels import policy_loss

    adv = torch.tensor(ADV, dtype=torch.float32)
    old = torch.full((2, 1), LOG_P_REF, dtype=torch.float32)
    if name == "sft":
        return -torch.nn.functional.logsigmoid(z)
    if name == "dpo":
        lp = _pair_logps(z).view(2)
        margin = (lp[0] - LOG_P_REF) - (lp[1] - LOG_P_REF)
        return -torch.nn.functional.logsigmoid(dpo_beta * margin)
    if name in ("grpo", "dapo", "gspo"):
        return policy_loss(_pair_logps(z), old, adv, loss=name)[0]
    if name == "opo":
        # The chi^2 loss on the logit margin: the "log-ratio" fed to OPO is +-(z - z_ref), as
        # log-probs margin − c against an anchor of −c (c keeps both <= 0; Δ is the margin).
        margin = torch.stack([z - Z_REF, -(z - Z_REF)]).view(2, 1)
        c = float(margin.detach().abs().max()) + 1.0
        return policy_loss(margin - c, torch.full((2, 1), -c), adv, loss="opo", mu=mu,
                           alpha=alpha)[0]
    if name in ("opo_logp_pair", "opo_logp_sampled"):
        lp = _pair_logps(z, detach_ybar=name == "opo_logp_sampled")
        return policy_loss(lp, old, adv, loss="opo", mu=mu, alpha=alpha)[0]
    raise ValueError(f"unknown curve {name!r}; known: {list(CURVES)}")


def grad_curve(name: str, zs, **kw) -> torch.Tensor:
    """|dL/dz| at each logit in ``zs`` (float64 tensor of the same length)."""
    out = []
    for zv in torch.as_tensor(zs, dtype=torch.float64).tolist():
        z = torch.tensor(zv, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(toy_loss(name, z, **kw), z)
        out.append(abs(g.item()))
    return torch.tensor(out, dtype=torch.float64)


def z_grid(z_min: float = -8.0, z_max: float = 12.0, n: int = 801) -> torch.Tensor:
    """Logits for the plot, denser near z_ref so that GSPO's tiny clip window shows."""
    dense = torch.linspace(-0.01, 0.01, 201, dtype=torch.float64)
    return torch.unique(torch.cat([torch.linspace(z_min, z_max, n, dtype=torch.float64), dense]))


def plot(out: Path, *, dpo_beta: float = 0.5, mu: float = 1.0, z_min: float = -8.0,
         z_max: float = 12.0, n: int = 801) -> dict:
    """Draw both panels into ``out``; return the grid and every curve (float64 tensors)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zs = z_grid(z_min, z_max, n)
    p = torch.sigmoid(zs)
    grads = {name: grad_curve(name, zs, dpo_beta=dpo_beta, mu=mu) for name in CURVES}
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(14, 5.5))
    hi = p >= 0.5
    for name, (label, style, coord) in CURVES.items():
        g = grads[name]
        ax_a.plot(p, g, label=f"{label}  [{coord}]", **style)
        ax_b.plot(p[hi], g[hi].clamp_min(ZERO_FLOOR), **style)
    ax_a.set_xlabel("confidence p = sigmoid(z)")
    ax_a.set_ylabel("|dL/dz|")
    ax_a.set_title("(a) gradient magnitude vs confidence")
    ax_a.set_ylim(0, max(2.0, float(grads["opo"].max()) * 1.05))
    ax_a.legend(fontsize=7.5, loc="upper center")
    ax_b.set_yscale("log")
    ax_b.set_xscale("logit")
    ax_b.set_xlabel("p (logit scale), p >= 0.5")
    ax_b.set_title(f"(b) log scale; exact zeros drawn at {ZERO_FLOOR:g}")
    cliffs = []
    for name in ("grpo", "dapo", "gspo"):
        nz = (grads[name] > 0) & hi
        if nz.any():
            cliffs.append(f"{CURVES[name][0]}: last nonzero at p = {float(p[nz].max()):.4f}, "
                          "exactly 0 above")
    ax_b.text(0.98, 0.03, "\n".join(cliffs), transform=ax_b.transAxes, ha="right", va="bottom",
              fontsize=8, bbox=dict(facecolor="white", alpha=0.8))
    for a in (ax_a, ax_b):
        a.grid(True, which="both", alpha=0.3)
    fig.suptitle(
        f"Binary-logit toy, z_ref = 0, group = [y (A=+1), ybar (A=-1)], DPO beta = {dpo_beta}, "
        f"OPO mu = {mu}, alpha = 0.4. Autograd through opo_kernels.policy_loss.\n"
        "OPO's linear, O(1) gradient holds for the chi^2 loss on the logit margin (solid); "
        "through log sigma(z) the sampled action's term decays like (1 - p) (dotted).",
        fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return {"z": zs, "p": p, **grads}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.saturation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/figure4-saturation.png")
    ap.add_argument("--dpo-beta", type=float, default=0.5)
    ap.add_argument("--mu", type=float, default=1.0)
    ap.add_argument("--z-min", type=float, default=-8.0)
    ap.add_argument("--z-max", type=float, default=12.0)
    args = ap.parse_args(argv)
    res = plot(Path(args.out), dpo_beta=args.dpo_beta, mu=args.mu, z_min=args.z_min,
               z_max=args.z_max)
    p = res["p"]
    print(f"wrote {args.out}")
    for q in (0.5, 0.9, 0.99, 0.9999):
        i = int(torch.argmin((p - q).abs()))
        print(f"p={float(p[i]):.6f}: " + ", ".join(f"{k}={float(res[k][i]):.3g}" for k in CURVES))


if __name__ == "__main__":
    main()
