"""The benchmark's cases as a pytest-benchmark suite (small CPU shape).

Run explicitly: ``pytest bench/bench_losses.py`` (add ``--benchmark-json FILE`` to keep the
numbers). The file name does not match pytest's ``test_*.py`` pattern and ``bench/`` is outside
``testpaths``, so the default test run never collects it; pytest collects a file named on the
command line whatever its name.

Each method of :data:`bench.cases.METHODS` that runs on CPU is timed on peaked and flat inputs;
the peak memory above inputs and gradients (see :mod:`bench.measure`) and the inputs' mean token
entropy go into ``extra_info``. Methods that cannot run here are skipped with the reason.
"""
import math

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench import measure  # noqa: E402
from bench.cases import (METHOD_NAMES, PRESETS, Unavailable, get_method, make_inputs,  # noqa: E402
                         naive_opo)

SHAPE = PRESETS["cpu-quick"]
_inputs = {}


def inputs(kind):
    if kind not in _inputs:
        _inputs[kind] = make_inputs(SHAPE, kind, "cpu", seed=0)
    return _inputs[kind]


@pytest.mark.parametrize("kind", ["peaked", "flat"])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_fwd_bwd(benchmark, name, kind):
    m = get_method(name)
    if "cpu" not in m.devices:
        pytest.skip(f"{name}: {m.why_not}")
    x = inputs(kind)
    try:
        step = m.build(x)
    except Unavailable as e:
        pytest.skip(str(e))
    x.zero_grad()
    step()
    peak, _, _ = measure.peak_cpu(step, x.zero_grad, x.grad_bytes())
    benchmark.group = f"{SHAPE.label()} {kind}"
    benchmark.extra_info.update(entropy=x.entropy, peak_bytes=peak, shape=SHAPE.label())
    benchmark.pedantic(step, setup=x.zero_grad, rounds=5, warmup_rounds=max(0, m.warmup - 1),
                       iterations=1)
    x.zero_grad()


@pytest.mark.parametrize("kind,lo,hi", [("peaked", 0.5, 3.0), ("flat", None, None)])
def test_inputs_look_as_specified(kind, lo, hi):
    x = inputs(kind)
    if kind == "peaked":
        assert lo <= x.entropy <= hi
    else:
        assert x.entropy > math.log(SHAPE.V) - 0.1
    assert x.hidden.abs().min() >= 0 and x.hidden.abs().max() > 0  # never zeros
    assert (x.old_logps - x.old_logps.mean()).abs().max() > 0


def test_naive_opo_matches_float64_reference_and_fused():
    """The baseline computes the same loss and gradients as the library (a fair comparison)."""
    x = inputs("peaked")
    h = x.hidden.detach().double().requires_grad_(True)
    w = x.weight.detach().double().requires_grad_(True)
    logp = torch.log_softmax(h @ w.T, -1).gather(-1, x.targets[..., None]).squeeze(-1)
    delta = (logp - x.old_logps.double()).mean(-1)
    a = 0.6 * x.advantages.double()
    e = torch.exp(a - a.max())
    omega = (e - e.mean()) / (e.std(unbiased=False) + 1e-6)
    ref = (-omega * delta + 0.5 * delta ** 2).mean()
    ref.backward()
    x.zero_grad()
    loss = naive_opo(x.hidden, x.weight, x.targets, x.old_logps, x.advantages)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(x.hidden.grad.double(), h.grad, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(x.weight.grad.double(), w.grad, rtol=1e-3, atol=1e-7)
    from opo_kernels import fused_opo_loss
    x.zero_grad()
    fused, _ = fused_opo_loss(x.hidden, x.weight, x.targets, x.advantages, x.old_logps)
    fused.backward()
    assert fused.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(x.weight.grad.double(), w.grad, rtol=1e-3, atol=1e-7)
    x.zero_grad()


def test_cpu_memory_probe_sees_known_allocations():
    def step():
        a = torch.empty(1000, 1000)          # 4 MB
        b = torch.empty(500, 1000)           # +2 MB: peak 6 MB
        del a
        c = torch.empty(250, 1000)           # 3 MB in use
        return b, c

    keep = []
    peak, held, raw = measure.peak_cpu(lambda: keep.append(step()), lambda: keep.clear(), 1_000_000)
    assert raw == 6_000_000 and peak == 5_000_000 and held == 3_000_000
