"""medgen's training loss (medgen/lm_loss.py) against the plain computation and against TRL's own loss."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from medgen.lm_loss import NextTokenNLL
from tests.helpers import REFERENCE_TRAIN, TINY, adapter, medgen


@pytest.mark.parametrize("bias", [False, True])
def test_the_blocked_loss_and_its_gradient_equal_cross_entropy_over_the_whole_logits(bias):
    torch.manual_seed(0)
    n, h, v = 37, 16, 101
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight, b = torch.randn(v, h, dtype=torch.float64), torch.randn(v, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (n,))
    ours = NextTokenNLL.apply(hidden, weight, b, targets, 8)  # 8 rows a block: five blocks, the last one short
    (g_ours,) = torch.autograd.grad(3.0 * ours, hidden)
    plain = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum")
    (g_plain,) = torch.autograd.grad(3.0 * plain, hidden)
    assert ours.item() == pytest.approx(plain.item(), rel=1e-6)  # its sums are fp32
    assert torch.allclose(g_ours, g_plain, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # two training runs
def test_token_metrics_are_trls_loss_with_entropy_and_accuracy_and_the_same_training(tmp_path, shards):
    runs = {}
    for on in (False, True):
        runs[on] = tmp_path / str(on)
        medgen("train", *TINY, f"run.dir={runs[on]}", f"data.shards={shards}", *REFERENCE_TRAIN,
               f"train.token_metrics={str(on).lower()}", "train.validate=false")
    logs = {on: [json.loads(x) for x in (r / "train_log.jsonl").read_text().splitlines()] for on, r in runs.items()}
    assert all("entropy" in r and "mean_token_accuracy" in r for r in logs[True] if "loss" in r)
    assert not any("entropy" in r or "mean_token_accuracy" in r for r in logs[False])
    # the same loss through two kernels: equal within fp32 rounding at every step, and so are the adapters
    losses = {on: [r["loss"] for r in log if "loss" in r] for on, log in logs.items()}
    assert len(losses[False]) == 8 and losses[False] == pytest.approx(losses[True], rel=1e-5)
    a, b = adapter(runs[False]), adapter(runs[True])
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5 * max(float(a[k].abs().max()) for k in a)
