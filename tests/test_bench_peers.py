"""Optional peer baselines in the benchmarks: a missing or broken peer is skipped with its reason, an installed one
computes what our op computes, and the GPU check scripts parse."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_fast import reference
from rlhf_fast.bench import linear
from rlhf_fast.bench.harness import Bench, optional

ROOT = Path(__file__).resolve().parents[1]


def test_optional_reports_the_root_cause(capsys):
    def load():
        try:
            raise ModuleNotFoundError("No module named 'datasets'")
        except ModuleNotFoundError as exc:
            raise RuntimeError("Failed to import trl.trainer.utils") from exc

    assert optional("peer", load) is None
    assert "skipped peer: ModuleNotFoundError: No module named 'datasets'" in capsys.readouterr().out


@pytest.fixture
def broken_trl(tmp_path, monkeypatch):
    """A `trl` whose kernels import but whose trainer utils (needed by the backward) do not."""
    (tmp_path / "trl" / "trainer").mkdir(parents=True)
    (tmp_path / "trl" / "__init__.py").write_text("")
    (tmp_path / "trl" / "kernels.py").write_text("ChunkedLogProbFunction = object\n")
    (tmp_path / "trl" / "trainer" / "__init__.py").write_text("")
    (tmp_path / "trl" / "trainer" / "utils.py").write_text("import datasets_that_is_not_there\n")
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "trl" or k.startswith("trl.")}
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for k in [k for k in sys.modules if k == "trl" or k.startswith("trl.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def test_linear_quick_skips_a_peer_whose_backward_cannot_import(broken_trl, capsys):
    bench = Bench(quick=True, device=torch.device("cpu"))
    linear.run(bench)
    out = capsys.readouterr().out
    assert "skipped trl ChunkedLogProbFunction: ModuleNotFoundError: No module named 'datasets_that_is_not_there'" in out
    providers = {r.provider for r in bench.rows}
    assert not [p for p in providers if p.startswith("trl")]
    assert {"eager unfused", "rlhf_fast (torch ref)"} <= providers


def _peers_or_skip():
    for name in ("trl.kernels", "trl.trainer.utils", "liger_kernel.chunked_loss"):
        pytest.importorskip(name, reason="peer baselines not installed (benchmarks/fetch_gpu_wheels.sh)")


def test_peers_compute_our_log_probs_and_loss():
    """TRL's fused LM head and Liger's fused linear GRPO loss, as the benchmark calls them, give our gradients."""
    _peers_or_skip()
    torch.manual_seed(0)
    rows, steps, h, v = 4, 32, 16, 300
    hidden = torch.randn(rows * steps, h, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(v, h, dtype=torch.float64) * h**-0.5).requires_grad_()
    labels = torch.randint(0, v, (rows * steps,))
    both = (hidden, weight)
    grad_logp = torch.randn(rows * steps, dtype=torch.float64)
    trl = linear._load_trl_chunked()
    got = torch.autograd.grad(trl(hidden, weight, labels), both, grad_logp)
    want = torch.autograd.grad(reference.linear_logprobs(hidden, weight, labels), both, grad_logp)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)  # TRL folds the tiles in fp32

    with torch.no_grad():
        logp0 = reference.linear_logprobs(hidden, weight, labels).view(rows, steps)
    old = logp0 + 0.1 * torch.randn(rows, steps, dtype=torch.float64)
    ref = logp0 + 0.1 * torch.randn(rows, steps, dtype=torch.float64)
    adv = torch.randn(rows, dtype=torch.float64)
    mask = torch.rand(rows, steps) > 0.1
    ours, _ = reference.fused_linear_ppo_loss(hidden.view(rows, steps, h), weight, labels.view(rows, steps), old, adv,
                                              mask, ref_logp=ref, kl_coef=0.04, clip_low=0.2, clip_high=0.28)
    liger = linear._load_liger_grpo(0.04, 0.2, 0.28)
    theirs, _ = liger(hidden.view(rows, steps, h), weight, labels.view(rows, steps), mask.double(), adv,
                      ref_per_token_logps=ref, old_per_token_logps=old)
    torch.testing.assert_close(theirs.double(), ours, rtol=1e-6, atol=1e-6)  # Liger sums its loss in fp32
    for g, w in zip(torch.autograd.grad(theirs, both), torch.autograd.grad(ours, both)):
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("script", ["gpu_check.sh", "fetch_gpu_wheels.sh"])
def test_gpu_scripts_parse(script):
    out = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
