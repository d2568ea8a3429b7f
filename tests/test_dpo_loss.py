"""ops.dpo_loss against an independent computation from the papers' formulas, on both backends.

The oracle below is written from the papers (DPO, cDPO / rDPO label smoothing, SLiC hinge, IPO, SimPO) with
plain per-pair loops, not from rlhf_fast.reference. Every loss type is checked forward (loss and the implicit
reward statistics) and backward (gradients of the policy's and the reference's per-token log-probs for a random
upstream gradient) through ``ops.dpo_loss`` with ``RLHF_FAST_BACKEND=torch`` (the reference) and ``triton``
(the kernel; under TRITON_INTERPRET=1 on CPU).
"""
import math

import pytest
import torch

from rlhf_fast import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo")


def _log_sigmoid(x):
    return -torch.log1p(torch.exp(-x)) if x >= 0 else x - torch.log1p(torch.exp(x))


def oracle(pc_tok, pr_tok, mc, mr, rc_tok, rr_tok, *, beta, loss_type, eps=0.0, gamma=0.5, reference_free=False):
    """Loss and mean implicit rewards, pair by pair in float64, straight from the formulas."""
    losses, rewards_c, rewards_r = [], [], []
    for b in range(pc_tok.shape[0]):
        c_tokens, r_tokens = mc[b].bool(), mr[b].bool()
        pi_c, pi_r = pc_tok[b][c_tokens].double().sum(), pr_tok[b][r_tokens].double().sum()
        no_ref = reference_free or loss_type == "simpo"
        ref_c = 0.0 if no_ref else rc_tok[b][c_tokens].double().sum()
        ref_r = 0.0 if no_ref else rr_tok[b][r_tokens].double().sum()
        n_c, n_r = max(1, int(c_tokens.sum())), max(1, int(r_tokens.sum()))
        if loss_type in ("ipo", "simpo"):  # IPO and SimPO use log-probs averaged over the completion
            h_c, h_r = (pi_c - ref_c) / n_c, (pi_r - ref_r) / n_r
        else:
            h_c, h_r = pi_c - ref_c, pi_r - ref_r
        u = h_c - h_r
        if loss_type == "sigmoid":  # DPO (Rafailov et al.) with cDPO smoothing
            loss = -(1 - eps) * _log_sigmoid(beta * u) - eps * _log_sigmoid(-beta * u)
        elif loss_type == "robust":  # rDPO (Chowdhury et al.)
            loss = ((1 - eps) * -_log_sigmoid(beta * u) + eps * _log_sigmoid(-beta * u)) / (1 - 2 * eps)
        elif loss_type == "hinge":  # SLiC
            loss = torch.clamp(1 - beta * u, min=0)
        elif loss_type == "ipo":  # IPO (Azar et al.): (h - 1/(2 tau))^2
            loss = (u - 1 / (2 * beta)) ** 2
        else:  # SimPO (Meng et al.): -log sigma(beta * avg_c - beta * avg_r - gamma), smoothed like cDPO
            m = beta * u - gamma
            loss = -(1 - eps) * _log_sigmoid(m) - eps * _log_sigmoid(-m)
        losses.append(loss)
        rewards_c.append(beta * h_c)
        rewards_r.append(beta * h_r)
    n = len(losses)
    rc, rr = torch.stack(rewards_c), torch.stack(rewards_r)
    stats = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
             "rewards/accuracies": (rc > rr).double().mean(), "rewards/margins": (rc - rr).mean()}
    return torch.stack(losses).sum() / n, stats


def _inputs(pairs=5, steps_c=23, steps_r=17, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pc, pr = torch.randn(pairs, steps_c, generator=g) - 2, torch.randn(pairs, steps_r, generator=g) - 2
    rc, rr = pc + 0.3 * torch.randn(pairs, steps_c, generator=g), pr + 0.3 * torch.randn(pairs, steps_r, generator=g)
    mc, mr = torch.rand(pairs, steps_c, generator=g) > 0.3, torch.rand(pairs, steps_r, generator=g) > 0.3
    mc[0, :5] = False
    mr[1] = False  # a rejected completion with no token: lengths clamp to 1, nothing divides by 0
    cast = lambda t: t.to(dtype).to(DEVICE)  # noqa: E731
    return cast(pc), cast(pr), mc.to(DEVICE), mr.to(DEVICE), cast(rc), cast(rr)


def _grads(loss, leaves, upstream):
    return torch.autograd.grad(loss * upstream, leaves)


CASES = [(lt, eps, free) for lt in LOSS_TYPES for eps in (0.0, 0.1) for free in (False, True)
         if not (eps and lt in ("hinge", "ipo"))]


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("loss_type,eps,reference_free", CASES)
def test_dpo_loss_matches_the_papers(backend, backend_name, loss_type, eps, reference_free):
    backend(backend_name)
    beta = 0.7 if loss_type != "ipo" else 0.4
    pc, pr, mc, mr, rc, rr = _inputs(seed=len(loss_type) + int(10 * eps))
    leaves = [t.detach().clone().requires_grad_(True) for t in (pc, pr, rc, rr)]
    upstream = torch.tensor(1.3, dtype=torch.float64)
    oracle_leaves = [x.detach().double().requires_grad_(True) for x in leaves]  # autograd through the loops
    want, want_stats = oracle(oracle_leaves[0], oracle_leaves[1], mc, mr, oracle_leaves[2], oracle_leaves[3],
                              beta=beta, loss_type=loss_type, eps=eps, reference_free=reference_free)
    uses_ref = not reference_free and loss_type != "simpo"
    want_grads = torch.autograd.grad(want * upstream, oracle_leaves if uses_ref else oracle_leaves[:2])

    loss, stats = ops.dpo_loss(leaves[0], leaves[1], mc, mr, ref_chosen_logp=leaves[2], ref_rejected_logp=leaves[3],
                               beta=beta, loss_type=loss_type, label_smoothing=eps, reference_free=reference_free)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), want.detach(), atol=1e-5, rtol=1e-5)
    assert set(stats) == set(want_stats)
    for key, value in want_stats.items():
        assert stats[key].dtype == torch.float32 and stats[key].dim() == 0
        torch.testing.assert_close(stats[key].double(), value.detach(), atol=1e-5, rtol=1e-5, msg=key)
    grads = _grads(loss, leaves if uses_ref else leaves[:2], upstream.float())
    assert any(g.abs().max() > 0 for g in want_grads)  # the case exercises a non-zero gradient
    for got, expected, leaf in zip(grads, want_grads, leaves):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_per_sequence_reference_sums_equal_per_token(backend, backend_name):
    """Precomputed reference log-probs are per-sequence sums ``[B]``: the same loss and gradients."""
    backend(backend_name)
    pc, pr, mc, mr, rc, rr = _inputs(seed=3)
    for loss_type in ("sigmoid", "ipo"):
        a, b = pc.clone().requires_grad_(True), pc.clone().requires_grad_(True)
        per_token, _ = ops.dpo_loss(a, pr, mc, mr, ref_chosen_logp=rc, ref_rejected_logp=rr, loss_type=loss_type)
        sums_c, sums_r = (rc * mc).sum(-1), (rr * mr).sum(-1)
        per_seq, _ = ops.dpo_loss(b, pr, mc, mr, ref_chosen_logp=sums_c, ref_rejected_logp=sums_r,
                                  loss_type=loss_type)
        torch.testing.assert_close(per_seq, per_token, atol=1e-5, rtol=1e-5)
        (ga,), (gb,) = torch.autograd.grad(per_token, a), torch.autograd.grad(per_seq, b)
        torch.testing.assert_close(gb, ga)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_inputs_against_fp32_reference(backend, tol, dtype):
    pc, pr, mc, mr, rc, rr = _inputs(seed=5, dtype=dtype)
    results = {}
    for name in ("torch", "triton"):
        backend(name)
        leaf = pc.clone().requires_grad_(True)
        cast = (lambda t: t.float()) if name == "torch" else (lambda t: t)  # noqa: E731
        inputs = leaf.float() if name == "torch" else leaf
        loss, _ = ops.dpo_loss(inputs, cast(pr), mc, mr, ref_chosen_logp=cast(rc), ref_rejected_logp=cast(rr))
        (grad,) = torch.autograd.grad(loss, leaf)
        assert grad.dtype == dtype
        results[name] = (loss, grad)
    atol, rtol = tol(dtype)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=atol, rtol=rtol)
    torch.testing.assert_close(results["triton"][1].float(), results["torch"][1].float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_num_pairs_override_and_empty_batch(backend, backend_name):
    backend(backend_name)
    pc, pr, mc, mr, rc, rr = _inputs(seed=7)
    local, stats = ops.dpo_loss(pc, pr, mc, mr, ref_chosen_logp=rc, ref_rejected_logp=rr)
    scaled, scaled_stats = ops.dpo_loss(pc, pr, mc, mr, ref_chosen_logp=rc, ref_rejected_logp=rr, num_pairs=20)
    torch.testing.assert_close(scaled, local * 5 / 20)
    torch.testing.assert_close(scaled_stats["rewards/margins"], stats["rewards/margins"] * 5 / 20)
    empty = torch.zeros(0, 4, device=DEVICE)
    loss, stats = ops.dpo_loss(empty, empty, empty.bool(), empty.bool(), reference_free=True)
    assert float(loss) == 0.0 and not math.isnan(float(stats["rewards/margins"]))


def test_bad_input_names_the_argument():
    pc, pr, mc, mr, rc, rr = _inputs()
    with pytest.raises(ValueError, match="loss_type: expected one of"):
        ops.dpo_loss(pc, pr, mc, mr, ref_chosen_logp=rc, ref_rejected_logp=rr, loss_type="kto")
    with pytest.raises(ValueError, match="ref_chosen_logp: expected the reference"):
        ops.dpo_loss(pc, pr, mc, mr)
    with pytest.raises(ValueError, match="label_smoothing: 'ipo' takes no label smoothing"):
        ops.dpo_loss(pc, pr, mc, mr, ref_chosen_logp=rc, ref_rejected_logp=rr, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing: expected a value in \[0, 0.5\)"):
        ops.dpo_loss(pc, pr, mc, mr, ref_chosen_logp=rc, ref_rejected_logp=rr, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta: expected a value > 0"):
        ops.dpo_loss(pc, pr, mc, mr, reference_free=True, beta=0.0)
    with pytest.raises(ValueError, match="chosen_mask: expected shape"):
        ops.dpo_loss(pc, pr, mr, mr, reference_free=True)
    with pytest.raises(ValueError, match="rejected_logp: expected 5 rows"):
        ops.dpo_loss(pc, pr[:3], mc, mr[:3], reference_free=True)
    with pytest.raises(ValueError, match=r"ref_rejected_logp: expected shape \(5, 17\).*or \(5,\)"):
        ops.dpo_loss(pc, pr, mc, mr, ref_chosen_logp=rc, ref_rejected_logp=rc)
    with pytest.raises(TypeError, match="chosen_logp: expected dtype"):
        ops.dpo_loss(pc.long(), pr, mc, mr, reference_free=True)


def test_dpo_kernel_compiles_for_sm90():
    """The interpreter accepts code the compiler rejects: lower every loss type and reference layout to sm_90."""
    from _sm90 import compile_for_sm90

    compile_for_sm90("""
    from rlhf_fast.kernels import dpo as D

    types = {n: "*fp32" for n in D._dpo_fwd_kernel.arg_names if n.endswith("_ptr")}
    types.update({"chosen_ptr": "*bf16", "chosen_mask_ptr": "*u8", "rejected_ptr": "*fp16",
                  "rejected_mask_ptr": "*i64"})
    for code in sorted(set(D.LOSS_CODES.values())):
        for ref in (D.REF_NONE, D.REF_PER_SEQUENCE, D.REF_PER_TOKEN):
            compile_one(D._dpo_fwd_kernel, types, {"BETA": 0.1, "EPS": 0.1, "SHIFT": 0.0, "LOSS": code,
                                                   "AVERAGE": code == 3, "REF": ref, "BLOCK": D.BLOCK_T})
    print("compiled")
    """)
