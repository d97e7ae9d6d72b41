"""SAE zoo: every variant's interface, persistence, selection rules and the exact math of the shared pieces."""

from __future__ import annotations

import json

import pytest
import torch

import trainer.sae as sae_zoo
from store.errors import UserError
from trainer.sae import sparse_ops
from trainer.sae.base import Codes
from trainer.sae.sparse_ops import select_linear, sparse_decode
from trainer.sparsemax import sparsemax_sort

D, M, K, B = 16, 64, 4, 32
EXTRA = {"jumprelu": {"bandwidth": 0.5, "threshold_init": 0.05}, "topk": {"k": K}, "batchtopk": {"k": K},
         "matryoshka": {"k": K}}


def make(variant: str, **kw) -> sae_zoo.SAE:
    return sae_zoo.build({"variant": variant, "d": D, "m": M, "seed": 3, **EXTRA.get(variant, {}), **kw})


def batch(b: int = B, seed: int = 123) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(b, D, generator=gen) + 0.5


def train_steps(sae: sae_zoo.SAE, n: int = 2) -> None:
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for i in range(n):
        _, _, losses = sae(batch(seed=i))
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        sae.post_step()


@pytest.mark.parametrize("variant", sorted(sae_zoo.variants()))
def test_forward_shapes_loss_and_gradients(variant: str) -> None:
    sae = make(variant)
    x = batch()
    x_hat, codes, losses = sae(x)
    assert x_hat.shape == (B, D)
    assert codes.m == M and codes.to_dense().shape == (B, M)
    assert codes.support_sizes().shape == (B,) and codes.fire_counts().shape == (M,)
    assert int(codes.fire_counts().sum()) == int(codes.support_sizes().sum())
    assert losses["loss"].dim() == 0 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    for name, param in sae.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    # sparse and dense decoding of the same codes agree
    dense = Codes(m=M, dense=codes.to_dense(), norms=codes.norms)
    torch.testing.assert_close(sae.decode(codes), sae.decode(dense), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(codes, x), x_hat, rtol=1e-5, atol=1e-5)
    if variant in ("sparsemax", "topk", "batchtopk", "matryoshka", "mlp_sparsemax"):
        assert codes.is_sparse and codes.idx.shape[1] < M
    if variant in ("relu", "attn_relu"):
        assert not codes.is_sparse


@pytest.mark.parametrize("variant", sorted(sae_zoo.variants()))
def test_save_load_gives_identical_outputs(variant: str, tmp_path) -> None:
    sae = make(variant)
    train_steps(sae)
    sae.save(str(tmp_path / "sae"))
    loaded = sae_zoo.load(str(tmp_path / "sae"))
    assert type(loaded) is type(sae) and loaded.config == sae.config
    for key, value in sae.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    sae.eval()
    loaded.eval()
    x = batch(seed=99)
    with torch.no_grad():
        a, b = sae(x), loaded(x)
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1].to_dense(), b[1].to_dense())


def test_load_accepts_a_run_config(tmp_path) -> None:
    sae = make("topk")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"name": "r", "lr": 3e-4, "sae": sae.config.model_dump()}))
    sae.save_weights(str(run))
    loaded = sae_zoo.load(str(run))
    assert torch.equal(loaded.decoder.weight, sae.decoder.weight)


def test_load_rejects_mismatched_weights(tmp_path) -> None:
    make("relu").save(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["m"] = 2 * M
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="shape"):
        sae_zoo.load(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        sae_zoo.load(str(tmp_path / "nowhere"))


def test_config_errors_and_defaults() -> None:
    with pytest.raises(UserError, match="'foo'.*sparsemax, relu"):
        sae_zoo.build({"variant": "foo", "d": 8, "m": 16})
    with pytest.raises(UserError, match="m = 0"):
        sae_zoo.build({"variant": "relu", "d": 8, "m": 0})
    with pytest.raises(UserError, match="sae.lambda is not a setting of variant 'relu'"):
        sae_zoo.build({"variant": "relu", "d": 8, "m": 16, "lambda": 1})
    with pytest.raises(UserError, match="sae.l1 is not a setting of variant 'topk'"):
        sae_zoo.build({"variant": "topk", "d": 8, "m": 16, "l1": 0.1})
    with pytest.raises(UserError, match="sae.max_fire_rate is not a setting of variant 'relu'"):
        sae_zoo.build({"variant": "relu", "d": 8, "m": 16, "max_fire_rate": 0.1})
    with pytest.raises(UserError, match="sae.k is not a setting of variant 'relu'"):
        sae_zoo.build({"variant": "relu", "d": 8, "m": 16, "k": 64})
    sm = sae_zoo.validate_sae({"variant": "sparsemax", "d": 768, "m": 3072})
    assert (sm.loss, sm.max_fire_rate, sm.activation) == ("norm_mse", 0.1, "scores")
    assert not hasattr(sm, "l1")
    relu = sae_zoo.validate_sae({"variant": "relu", "d": 768, "m": 3072})
    assert (relu.loss, relu.l1, relu.target_l0) == ("mse", 1e-3, None)
    assert sae_zoo.validate_sae({"variant": "topk", "d": 768, "m": 3072}).aux_k == 512  # power of two near d/2
    assert sae_zoo.validate_sae({"variant": "mlp_sparsemax", "d": 8, "m": 16}).loss == "norm_mse"


def test_codes_methods_by_hand() -> None:
    codes = Codes(m=4, idx=torch.tensor([[2, 0, 1], [1, 3, 0]]), val=torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.0, 0.0]]))
    assert torch.equal(codes.to_dense(), torch.tensor([[-1.0, 0.0, 0.5, 0.0], [0.0, 2.0, 0.0, 0.0]]))
    assert codes.support_sizes().tolist() == [2, 1]
    assert codes.fire_counts().tolist() == [1, 1, 1, 0]
    dense = Codes(m=4, dense=codes.to_dense())
    assert dense.support_sizes().tolist() == [2, 1] and dense.fire_counts().tolist() == [1, 1, 1, 0]


def test_topk_has_exactly_k_active() -> None:
    codes = make("topk").encode(batch())
    assert codes.support_sizes().tolist() == [K] * B


def test_batchtopk_batch_average_and_eval_threshold() -> None:
    sae = make("batchtopk")
    x = batch()
    codes = sae.encode(x)  # training mode: top K·B over the batch
    sizes = codes.support_sizes()
    assert int(sizes.sum()) == K * B and len(set(sizes.tolist())) > 1
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    kept = torch.relu(pre).flatten().topk(K * B).values
    assert float(sae.threshold) == pytest.approx(float(kept.min()))
    sae.eval()
    x2 = batch(seed=7)
    with torch.no_grad():
        pre2 = (x2 - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        expected = pre2 * (pre2 > sae.threshold)
        got = sae.encode(x2).to_dense()
    torch.testing.assert_close(got, expected)
    assert float(sae.threshold) == pytest.approx(float(kept.min()))  # eval does not move θ


def test_sparsemax_support_sizes_vary() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, D, generator=gen) * torch.linspace(0.1, 3, B)[:, None]
    sizes = make("sparsemax").encode(x).support_sizes()
    assert len(set(sizes.tolist())) > 3 and int(sizes.min()) >= 1


def test_sparse_decode_matches_dense_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(M, D, generator=gen, requires_grad=True)
    idx = torch.rand(B, M, generator=gen).topk(6, dim=-1).indices
    val = torch.randn(B, 6, generator=gen)
    val[:, -1] = 0  # padding
    val.requires_grad_(True)
    out = sparse_decode(idx, val, w)
    dense = torch.zeros(B, M).scatter_add(1, idx, val)
    ref = dense @ w
    torch.testing.assert_close(out, ref)
    g = torch.randn(B, D, generator=gen)
    gw, gv = torch.autograd.grad(out, (w, val), g)
    rw, rv = torch.autograd.grad(ref, (w, val), g)
    torch.testing.assert_close(gw, rw)
    torch.testing.assert_close(gv, rv)


def test_select_linear_matches_dense_gather() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=gen, requires_grad=True)
    w = torch.randn(M, D, generator=gen, requires_grad=True)
    idx = torch.rand(B, M, generator=gen).topk(5, dim=-1).indices
    full = (x @ w.T).detach()
    out = select_linear(x, w, idx, full)
    ref = (x @ w.T).gather(1, idx)
    torch.testing.assert_close(out, ref)
    g = torch.randn(B, 5, generator=gen)
    for a, b in zip(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("activation", ["scores", "probs"])
def test_sparsemax_sae_equals_authors_dense_formula(activation: str) -> None:
    sae = make("sparsemax", activation=activation, max_fire_rate=None)
    with torch.no_grad():  # move away from the identity init so W_K, W_V matter
        gen = torch.Generator().manual_seed(2)
        sae.W_K.add_(0.3 * torch.randn(D, D, generator=gen))
        sae.W_V.add_(0.3 * torch.randn(D, D, generator=gen))
        sae.C.mul_(4.0)
    x = batch()
    x_hat, codes, losses = sae(x)
    # the authors' formulation: C W_K and C W_V formed, dense scores, full-sort sparsemax
    norms = x.norm(dim=-1, keepdim=True)
    z = (x / norms) @ (sae.C @ sae.W_K).T  # z = x_n (C W_K)ᵀ
    p = sparsemax_sort(z)
    a = p if activation == "probs" else z * (p > 0).detach()  # a = z ⊙ 1_S
    ref = norms * (a @ (sae.C @ sae.W_V))  # x̂ = ‖x‖ a (C W_V)
    torch.testing.assert_close(x_hat, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(codes.to_dense(), a, rtol=1e-4, atol=1e-6)
    ref_loss = ((ref - x).pow(2) / norms).mean()  # authors' loss
    torch.testing.assert_close(losses["loss"], ref_loss, rtol=1e-4, atol=1e-6)
    params = (sae.C, sae.W_K, sae.W_V)
    ours = torch.autograd.grad(losses["loss"], params, retain_graph=True)
    theirs = torch.autograd.grad(ref_loss, params)
    for g1, g2 in zip(ours, theirs):
        torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-6)
    again = torch.autograd.grad(losses["loss"], params)  # the retained graph differentiates twice
    for g1, g2 in zip(again, ours):
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_sparsemax_fire_rate_mask_and_update() -> None:
    sae = make("sparsemax", max_fire_rate=0.2)
    x = batch()
    top = int(sae.encode(x).fire_counts().argmax())  # training mode: also updated the buffer once
    sae.coder.fire_rate.zero_()
    sae.coder.fire_rate[top] = 0.5
    codes = sae.encode(x)
    assert int(codes.fire_counts()[top]) == 0  # masked: z = −inf in training
    expected = 0.01 * codes.fire_counts().float() / B
    expected[top] += 0.99 * 0.5
    torch.testing.assert_close(sae.coder.fire_rate, expected)
    sae.eval()
    before = sae.coder.fire_rate.clone()
    assert int(sae.encode(x).fire_counts()[top]) > 0  # eval: no mask, buffer unchanged
    assert torch.equal(sae.coder.fire_rate, before)


def test_unit_norm_decoder_gradient_projection_and_post_step() -> None:
    sae = make("topk")
    _, _, losses = sae(batch())
    losses["loss"].backward()
    w, g = sae.decoder.weight.detach(), sae.decoder.weight.grad
    assert float((g * w).sum(-1).abs().max()) < 1e-6  # no component along the rows
    with torch.no_grad():
        sae.decoder.weight.mul_(3.0)
    sae.post_step()
    torch.testing.assert_close(sae.decoder.weight.detach().norm(dim=-1), torch.ones(M))


def test_jumprelu_l0_threshold_gradient_by_hand() -> None:
    sae = sae_zoo.build({"variant": "jumprelu", "d": 2, "m": 2, "bandwidth": 0.2, "threshold_init": 0.5})
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
    x = torch.tensor([[0.45, 0.9], [0.55, 0.1], [0.7, 0.58]])  # π = x
    _, codes, losses = sae(x)
    assert float(losses["l0"].detach()) == pytest.approx(4 / 3)  # active: (0.9), (0.55), (0.7, 0.58)
    (grad,) = torch.autograd.grad(losses["l0"], sae.log_threshold)
    # d/dlogθ = θ · (−1/ε) Σ_b K((π−θ)/ε) / B; K = 1 for π ∈ {0.45, 0.55} (latent 0) and {0.58} (latent 1)
    torch.testing.assert_close(grad, torch.tensor([0.5 * -5 * 2 / 3, 0.5 * -5 * 1 / 3]))
    assert torch.equal(codes.to_dense(), torch.tensor([[0.0, 0.9], [0.55, 0.0], [0.7, 0.58]]))


def test_topk_auxk_trains_dead_latents() -> None:
    sae = make("topk", dead_tokens=1)
    x = batch()
    sae(x)  # every latent not fired in this batch is now dead
    codes = sae.encode(x)
    _, _, losses = sae(x)
    assert float(losses["auxk"].detach()) > 0
    (grad,) = torch.autograd.grad(losses["auxk"], sae.W_enc)
    live = codes.fire_counts() > 0
    assert float(grad[~live].abs().sum()) > 0 and float(grad[live].abs().sum()) == 0


def test_unit_input_norm_is_positively_homogeneous_and_decode_needs_norms() -> None:
    sae = make("relu", input_norm="unit")
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(sae(3 * x)[0], 3 * sae(x)[0], rtol=1e-5, atol=1e-5)
    codes = sae.encode(x)
    codes.norms = None
    with pytest.raises(UserError, match="pass x"):
        sae.decode(codes)
    torch.testing.assert_close(sae.decode(codes, x), sae(x)[0])


def test_bad_input_shape_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"expects \(batch, 16\)"):
        make("topk").encode(torch.zeros(3, 5))


@pytest.mark.parametrize("m", [64, 4096])
def test_sparse_ops_gradients_match_dense_autograd(m: int) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, D, generator=gen, requires_grad=True)
    w = torch.randn(m, D, generator=gen, requires_grad=True)
    idx = torch.rand(8, m, generator=gen).topk(6, dim=-1).indices
    val = torch.randn(8, 6, generator=gen, requires_grad=True)
    out = select_linear(x, w, idx, (x @ w.T).detach()) + sparse_decode(idx, val, w).sum(-1, keepdim=True)
    ref = (x @ w.T).gather(1, idx) + (torch.zeros(8, m).scatter_add(1, idx, val) @ w).sum(-1, keepdim=True)
    g = torch.randn(8, 6, generator=gen)
    for a, b in zip(torch.autograd.grad(out, (x, w, val), g), torch.autograd.grad(ref, (x, w, val), g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_sparse_kernels_csr_and_generic_paths_agree_with_dense(dtype: torch.dtype, masked: bool) -> None:
    """The CPU CSR kernels and the generic (gather / COO) kernels both equal the dense formulas over the
    pattern's entries, with repeated indices inside a row and unsorted rows; with a mask, only the
    masked positions are entries (one row has none)."""
    gen = torch.Generator().manual_seed(5)
    m, b, k = 50, 7, 9
    w = torch.randn(m, D, generator=gen).to(dtype)
    y = torch.randn(b, D, generator=gen).to(dtype)
    idx = torch.randint(0, m, (b, k), generator=gen)
    idx[:, -3:] = idx[:, -4:-3]  # repeated indices
    coef = torch.randn(b, k, generator=gen).to(dtype)
    mask = torch.ones(b, k, dtype=torch.bool)
    if masked:
        mask = torch.rand(b, k, generator=gen) < 0.6
        mask[2] = False  # a sample without entries
    pattern = sparse_ops.SupportPattern(idx, m, mask if masked else None)
    kept = torch.where(mask, coef.double(), 0.0)
    dense_dot = (y.double() @ w.double().T).gather(1, idx)  # ⟨y_b, W[idx]⟩
    dense_dw = torch.zeros(b, m, dtype=torch.float64).scatter_add(1, idx, kept).T @ y.double()
    tol = {"rtol": 2e-2, "atol": 2e-1} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-4}
    for dot in (sparse_ops.sampled_dot_csr, sparse_ops.sampled_dot_gather):
        out = dot(pattern, y, w)
        assert out.dtype == dtype and out.shape == (int(mask.sum()),)
        torch.testing.assert_close(out.double(), dense_dot[mask], **tol)
    for scatter in (sparse_ops.scatter_rows_csr, sparse_ops.scatter_rows_coo):
        if dtype == torch.bfloat16 and scatter is sparse_ops.scatter_rows_coo:
            continue  # COO sparse.mm has no bfloat16 CPU kernel; on CPU the CSR path serves half types
        out = scatter(pattern, pattern.flat(coef), y)
        assert out.dtype == dtype and out.shape == (m, D)
        torch.testing.assert_close(out.double(), dense_dw, **tol)
    padded = pattern.padded(pattern.flat(coef))
    assert torch.equal(padded, torch.where(mask, coef, 0))


def test_masked_pattern_ops_ignore_padding_exactly() -> None:
    """With a mask, decode and select_linear equal the dense formulas on the masked entries: padding
    (whatever its index and value) adds nothing, reads as 0 and gets no gradient."""
    gen = torch.Generator().manual_seed(6)
    m, b, k = 40, 6, 5
    x = torch.randn(b, D, generator=gen, requires_grad=True)
    w = torch.randn(m, D, generator=gen, requires_grad=True)
    idx = torch.randint(0, m, (b, k), generator=gen)
    val = torch.randn(b, k, generator=gen, requires_grad=True)  # non-zero in the padding too
    mask = torch.arange(k)[None, :] < torch.tensor([5, 3, 0, 1, 4, 2])[:, None]
    pattern = sparse_ops.SupportPattern(idx, m, mask)
    out = sparse_decode(idx, val, w, pattern) + select_linear(x, w, idx, (x @ w.T).detach(), pattern).sum(-1)[:, None]
    dense_val = torch.zeros(b, m).scatter_add(1, idx, torch.where(mask, val, 0.0))
    ref = dense_val @ w + torch.where(mask, (x @ w.T).gather(1, idx), 0.0).sum(-1)[:, None]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(b, D, generator=gen)
    for a, r in zip(torch.autograd.grad(out, (x, w, val), g), torch.autograd.grad(ref, (x, w, val), g)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_select_decode_equals_select_then_decode(dtype: torch.dtype) -> None:
    """The fused op (one dW for the shared W) equals select_linear → activation → sparse_decode: outputs
    and the gradients to x, W and through the returned codes."""
    gen = torch.Generator().manual_seed(7)
    m, b, k = 30, 6, 5
    idx = torch.rand(b, m, generator=gen).topk(k, dim=-1).indices
    mask = torch.arange(k)[None, :] < torch.tensor([5, 3, 1, 0, 4, 2])[:, None]
    pattern = sparse_ops.SupportPattern(idx, m, mask)

    def activation(s: torch.Tensor) -> torch.Tensor:  # probs-like: depends on the whole row
        tau = (torch.where(mask, s, 0.0).sum(-1, keepdim=True) - 1) / mask.sum(-1, keepdim=True).clamp_min(1)
        return torch.where(mask, (s - tau).clamp_min(0) + 0.1 * s, 0.0)

    outs = []
    for fused in (True, False):
        g2 = torch.Generator().manual_seed(8)
        x = torch.randn(b, D, generator=g2, dtype=dtype, requires_grad=True)
        w = torch.randn(m, D, generator=g2, dtype=dtype, requires_grad=True)
        full = (x @ w.T).detach()
        if fused:
            h, val = sparse_ops.select_decode(x, w, full, pattern, activation)
        else:
            val = activation(select_linear(x, w, idx, full, pattern))
            h = sparse_decode(idx, val, w, pattern)
        loss = (h * torch.linspace(-1, 1, D, dtype=dtype)).sum() + val.pow(2).sum()
        outs.append((h.detach(), val.detach(), *torch.autograd.grad(loss, (x, w))))
    for a, r in zip(*outs):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["relu", "topk", "sparsemax", "jumprelu"])
def test_input_scale_is_a_change_of_units(variant: str) -> None:
    """An SAE with input_scale s on x is the same SAE (same weights) on x/s, with x̂ multiplied by s and
    the losses unchanged: the scale only changes units, so λ keeps its meaning across models."""
    s = 7.5
    plain, scaled = make(variant), make(variant, input_scale=s)
    scaled.load_state_dict(plain.state_dict())
    x = batch() * s
    plain.eval(), scaled.eval()
    with torch.no_grad():
        xh1, codes1, losses1 = plain(x / s)
        xh2, codes2, losses2 = scaled(x)
        assert torch.allclose(xh2, xh1 * s, rtol=1e-5, atol=1e-5)
        assert torch.equal(codes1.to_dense(), codes2.to_dense())
        assert torch.allclose(losses1["loss"], losses2["loss"], rtol=1e-5)
        assert torch.allclose(scaled.decode(scaled.encode(x)), xh2, rtol=1e-5, atol=1e-5)
        assert torch.allclose(scaled.decode(scaled.encode(x), x), xh2, rtol=1e-5, atol=1e-5)
