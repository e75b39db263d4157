"""Each method's fast structured path against a dense reference built here from the formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_oft import AdapterConfig
from diffusion_oft.layers import OrthoLinear
from diffusion_oft.methods import get_method_class
from diffusion_oft.methods.butterfly import butterfly_permutation
from diffusion_oft.methods.cayley import cayley, skew_from_triu, triu_from_skew

torch.manual_seed(0)


def dense_cayley(skew: torch.Tensor) -> torch.Tensor:
    """(I + S)(I - S)^-1 in float64 with an explicit inverse (reference only)."""
    eye = torch.eye(skew.shape[-1], dtype=torch.float64)
    s = skew.double()
    return (eye + s) @ torch.linalg.inv(eye - s)


def dense_perm(perm: torch.Tensor | None, dim: int) -> torch.Tensor:
    mat = torch.zeros(dim, dim, dtype=torch.float64)
    idx = torch.arange(dim) if perm is None else perm
    mat[torch.arange(dim), idx] = 1.0  # P[k, perm[k]] = 1
    return mat


def dense_householder(vectors: list[torch.Tensor], signs: list[float]) -> torch.Tensor:
    """BlockDiag_i(I + sum_j sign_j v_ij v_ij^T / |v_ij|^2) from (n, b) vector sets."""
    n, b = vectors[0].shape
    blocks = []
    for i in range(n):
        h = torch.eye(b, dtype=torch.float64)
        for vec, sign in zip(vectors, signs, strict=True):
            v = vec[i].double()
            h = h + sign * torch.outer(v, v) / (v @ v)
        blocks.append(h)
    return torch.block_diag(*blocks)


def dense_reference_weight(method, weight: torch.Tensor) -> torch.Tensor:
    """W' from the papers' formulas with dense matrices (float64)."""
    cfg = method.config
    w = weight.double()
    if cfg.method in ("oft", "boft"):
        m = 1 if cfg.method == "oft" else cfg.n_butterfly_factors
        skews = skew_from_triu(method.skew.detach().reshape(m, method.num_blocks, -1), method.block_size)
        rot = torch.eye(method.dim, dtype=torch.float64)
        for level in range(m):  # R = B_m ... B_1, B_i = P_i BlockDiag(Cayley(S_i)) P_i^T
            p = dense_perm(butterfly_permutation(method.dim, method.block_size, level), method.dim)
            bd = torch.block_diag(*[dense_cayley(s) for s in skews[level]])
            rot = (p @ bd @ p.T) @ rot
        return w @ rot.T if cfg.side == "input" else rot @ w
    if cfg.method == "ether":
        side = "in" if cfg.side == "input" else "out"
        h = dense_householder([getattr(method, f"u_{side}").detach()], [-2.0])
        return w @ h if cfg.side == "input" else h @ w
    if cfg.method == "hra":  # D = H_1 ... H_r per block (PEFT: W' = W D); the layer's input transform is D^T
        u = getattr(method, "u_in" if cfg.side == "input" else "u_out").detach()
        d = dense_householder([u[0]], [-2.0])
        for i in range(1, u.shape[0]):
            d = d @ dense_householder([u[i]], [-2.0])
        return w @ d if cfg.side == "input" else d.T @ w
    h_in = dense_householder([method.u_in.detach(), method.v_in.detach()], [-1.0, 1.0])
    h_out = dense_householder([method.u_out.detach(), method.v_out.detach()], [-1.0, 1.0])
    return h_out @ w @ h_in  # ETHER+ two-sided: H~+ W H+


CASES = [
    dict(method="oft", block_size=4),
    dict(method="oft", num_blocks=2),
    dict(method="oft", block_size=4, side="output"),
    dict(method="boft", block_size=4, n_butterfly_factors=1),
    dict(method="boft", block_size=4, n_butterfly_factors=2),
    dict(method="boft", block_size=2, n_butterfly_factors=4),
    dict(method="boft", block_size=4, n_butterfly_factors=3, side="output"),
    dict(method="ether", num_blocks=4),
    dict(method="ether", num_blocks=1, side="output"),
    dict(method="ether_plus", num_blocks=2),
    dict(method="hra", n_reflections=4),
    dict(method="hra", n_reflections=3, num_blocks=2),
    dict(method="hra", n_reflections=2, block_size=8, side="output"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("grad", [True, False], ids=["activations", "weight"])
def test_fast_path_matches_dense_reference(case, grad):
    cfg = AdapterConfig(init="random", **case)
    linear = nn.Linear(16, 32)
    layer = OrthoLinear(linear)
    method = get_method_class(cfg.method)(16, 32, cfg)
    layer.add_adapter("a", method)
    x = torch.randn(3, 5, 16)
    with torch.set_grad_enabled(grad):  # grad: activations transformed; no grad: weight transformed
        out = layer(x)
    ref_w = dense_reference_weight(method, linear.weight.detach())
    ref = x.double() @ ref_w.T + linear.bias.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.adapted_weight(dtype=torch.float64), ref_w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c["method"] != "ether_plus"],
    ids=lambda c: "-".join(f"{v}" for v in c.values()),
)
def test_orthogonality_at_random_parameters(case):
    cfg = AdapterConfig(init="random", **case)
    method = get_method_class(cfg.method)(16, 32, cfg)
    with torch.no_grad():
        for p in method.parameters():
            p.normal_(std=0.5)
    (transform,) = method.transforms().values()
    r = transform.to_dense()
    eye = torch.eye(r.shape[0])
    assert (r.T @ r - eye).norm() <= 1e-5


def test_ether_plus_is_not_orthogonal_but_invertible():
    torch.manual_seed(0)  # its own draw, whatever the tests before it drew (the tables grow with methods)
    cfg = AdapterConfig(method="ether_plus", num_blocks=2, init="random")
    method = get_method_class("ether_plus")(16, 16, cfg)
    t = method.transforms()["input"]
    r = t.to_dense()
    assert (r.T @ r - torch.eye(16)).norm() > 1e-2
    inv = t.inverse().to_dense()
    # float32 products of a non-orthogonal H+ (condition number > 1) with its inverse
    torch.testing.assert_close(r.double() @ inv.double(), torch.eye(16, dtype=torch.float64), atol=5e-5, rtol=0)


@pytest.mark.parametrize("r", [1, 2, 5, 8])
def test_hra_product_and_scale_match_the_reflections(r):
    """HRA's compact product I + Y T Y^T equals the r reflections multiplied densely, at scale 1 and along
    its scale path (each reflection I - 2s u^ u^T), and a repeated vector cancels exactly."""
    from diffusion_oft.methods.hra import householder_product

    u = torch.randn(r, 3, 6, dtype=torch.float64)
    for scale in (1.0, 0.3, -0.7):
        y, t = householder_product(u, scale)
        got = torch.eye(6, dtype=torch.float64) + y.double() @ t.double() @ y.double().transpose(1, 2)  # (3, 6, 6)
        for blk in range(3):
            ref = torch.eye(6, dtype=torch.float64)
            for i in range(r):
                v = u[i, blk] / u[i, blk].norm()
                ref = ref @ (torch.eye(6, dtype=torch.float64) - 2 * scale * torch.outer(v, v))
            torch.testing.assert_close(got[blk], ref, atol=1e-5, rtol=0)
    pair = torch.randn(1, 2, 6).repeat(2, 1, 1)  # u_1 = u_2: H_1 H_2 = I
    y, t = householder_product(pair)
    assert torch.equal(y @ t @ y.transpose(1, 2), torch.zeros(2, 6, 6))


def test_hra_refuses_what_it_cannot_start_from():
    with pytest.raises(ValueError, match="even n_reflections"):
        AdapterConfig(method="hra", n_reflections=3, init="identity")
    with pytest.raises(ValueError, match="n_reflections applies to hra only"):
        AdapterConfig(method="oft", n_reflections=4)
    with pytest.raises(ValueError, match="n_reflections must be a positive integer"):
        AdapterConfig(method="hra", n_reflections=0)


def test_cayley_exact_and_neumann_agree_up_to_series_error():
    s = skew_from_triu(torch.randn(6, 28) * 0.02, 8)
    exact = cayley(s, "exact")
    rho = torch.linalg.matrix_norm(s, ord=2).max().item()  # spectral norm, < 1 here
    errors = []
    for k in (1, 2, 3, 5, 8):
        err = torch.linalg.matrix_norm(cayley(s, "neumann", k) - exact, ord=2).max().item()
        # |(I+S) sum_{i>k} S^i| <= 2 rho^(k+1) / (1 - rho)  (plus float32 rounding)
        assert err <= 2 * rho ** (k + 1) / (1 - rho) + 1e-6
        errors.append(err)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6
    # Same sign convention in both modes: first order R ~ I + 2S.
    small = s * 0.01
    torch.testing.assert_close(cayley(small, "exact"), torch.eye(8) + 2 * small, atol=2e-5, rtol=0)
    torch.testing.assert_close(cayley(s, "neumann", 1), torch.eye(8) + 2 * s + s @ s, atol=1e-6, rtol=0)


def test_skew_round_trip_and_zero_is_identity():
    vec = torch.randn(3, 10)
    torch.testing.assert_close(triu_from_skew(skew_from_triu(vec, 5)), vec)
    assert torch.equal(cayley(torch.zeros(2, 5, 5), "exact"), torch.eye(5).expand(2, 5, 5))
    assert torch.equal(cayley(torch.zeros(2, 5, 5), "neumann"), torch.eye(5).expand(2, 5, 5))


@pytest.mark.parametrize("dim,b,levels", [(16, 2, 4), (32, 4, 3), (48, 8, 2)])
def test_butterfly_permutations_are_permutations(dim, b, levels):
    assert butterfly_permutation(dim, b, 0) is None
    for level in range(1, levels):
        perm = butterfly_permutation(dim, b, level)
        assert sorted(perm.tolist()) == list(range(dim))
        assert not torch.equal(perm, torch.arange(dim))


def test_butterfly_matches_reference_layout():
    # dim 8, block 2, level 1: chunks of 4, half-blocks of 1 reordered evens first then odds.
    assert butterfly_permutation(8, 2, 1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert butterfly_permutation(8, 2, 2).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_coft_projection_clips_block_norms():
    cfg = AdapterConfig(method="oft", block_size=4, coft_eps=1e-3, init="random")
    method = get_method_class("oft")(16, 16, cfg)
    method.constrain_()
    norms = skew_from_triu(method.skew.detach(), 4).flatten(1).norm(dim=-1)
    assert torch.all(norms <= 1e-3 * (1 + 1e-5))
    assert torch.allclose(norms, torch.full_like(norms, 1e-3), rtol=1e-4)


def test_parameter_counts_follow_the_formulas():
    d_in, d_out = 64, 32
    count = lambda **kw: get_method_class(kw["method"]).num_parameters(d_in, d_out, AdapterConfig(**kw))
    assert count(method="oft", block_size=8) == d_in * (8 - 1) // 2
    assert count(method="boft", block_size=4, n_butterfly_factors=3) == 3 * d_in * (4 - 1) // 2
    assert count(method="ether", num_blocks=4) == d_in
    assert count(method="ether_plus", num_blocks=4) == 2 * (d_in + d_out)
    assert count(method="hra", n_reflections=8) == 8 * d_in
    assert count(method="oft", block_size=8, magnitude=True) == d_in * 7 // 2 + d_out


def test_invalid_structure_says_which_values_work():
    with pytest.raises(ValueError, match=r"block sizes that work for 20: \[2, 4, 5, 10, 20\]"):
        get_method_class("oft")(20, 8, AdapterConfig(method="oft", block_size=8))
    with pytest.raises(ValueError, match=r"n_butterfly_factors=3.*block sizes that work for 24: \[2, 6\]"):
        get_method_class("boft")(24, 8, AdapterConfig(method="boft", block_size=4, n_butterfly_factors=3))
    with pytest.raises(ValueError, match="block counts that work"):
        get_method_class("ether")(30, 8, AdapterConfig(method="ether", num_blocks=4))


@pytest.mark.parametrize("tokens", [8, 200])  # below / above d_out: activation side / weight side
def test_block_diagonal_linear_after_matches_rotate_then_linear(tokens):
    """linear_after puts the rotation on the frozen weight when d_out < tokens (README, Performance);
    value and gradients (x and the blocks) must equal rotating the activations, in float64."""
    from diffusion_oft.methods.transforms import ButterflyTransform, rotate_weight_first

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, tokens // 2, 64, dtype=torch.float64, generator=g, requires_grad=True)
    blocks = torch.randn(4, 16, 16, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(48, 64, dtype=torch.float64, generator=g)
    transform = ButterflyTransform(blocks.unsqueeze(0), [0])
    assert rotate_weight_first(x, weight) == (tokens > 48)
    fast = transform.linear_after(x, weight)
    reference = torch.nn.functional.linear(transform.right_mul(x), weight)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(fast.shape, dtype=torch.float64, generator=g)
    for a, b in zip(
        torch.autograd.grad(fast, (x, blocks), upstream),
        torch.autograd.grad(reference, (x, blocks), upstream),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_large_blocks_solve_with_several_threads_without_hanging():
    """Batched LU of blocks over ~150 with 2+ threads makes MKL fail or spin (pytorch#142815); large
    blocks (OFT num_blocks=4 on SD: 80-320) must still rotate, and unmerge, in a few seconds."""
    import subprocess
    import sys

    script = (
        "import torch; torch.set_num_threads(2); torch.manual_seed(0)\n"
        "from diffusion_oft.methods.cayley import cayley\n"
        "from diffusion_oft.methods.linalg import solve\n"
        "s = torch.randn(4, 160, 160) * 0.05; s = s - s.mT; eye = torch.eye(160)\n"
        "r = cayley(s)\n"
        "ref = torch.stack([torch.linalg.solve(eye - x, eye + x) for x in s])\n"
        "assert (r - ref).abs().max().item() == 0.0\n"
        "assert (r.mT @ r - eye).abs().max().item() < 1e-5\n"
        "inv = solve(r.double(), torch.eye(160, dtype=torch.float64).expand(4, 160, 160))\n"
        "assert (inv - r.double().mT).abs().max().item() < 1e-5\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_exact_cayley_by_the_doubling_product_matches_the_solve():
    from diffusion_oft.methods.cayley import SERIES_MAX_NORM

    torch.manual_seed(0)
    for size in (2, 8, 32):
        s = skew_from_triu(torch.randn(20, size * (size - 1) // 2), size)
        s = s * (SERIES_MAX_NORM / torch.linalg.matrix_norm(s).amax())  # largest |S|_F at the limit
        product = cayley(s, "exact", series_ok=True)
        solved = cayley(s.double(), "exact").float()
        torch.testing.assert_close(product, solved, atol=1e-6, rtol=0)
        eye = torch.eye(size).expand_as(product)
        torch.testing.assert_close(product @ product.mT, eye, atol=1e-6, rtol=0)
    zero = torch.zeros(3, 4, 4)
    assert torch.equal(cayley(zero, "exact", series_ok=True), torch.eye(4).expand(3, 4, 4))


@pytest.mark.parametrize("norm", [0.0, 1e-4, 1e-2, 0.1, 0.3, 0.5])
def test_shorter_doubling_products_for_small_generators_match_the_solve(norm):
    """The product's length follows the largest |S|_F (fewer matmuls for small S); values and
    gradients agree with a float64 solve whatever the length."""
    from diffusion_oft.methods.cayley import series_factors

    torch.manual_seed(1)
    s = skew_from_triu(torch.randn(16, 32 * 31 // 2), 32)
    s = s * (norm / torch.linalg.matrix_norm(s).amax().clamp_min(1e-30))  # largest |S|_F = norm
    factors = series_factors(norm)
    assert factors == {0.0: 0, 1e-4: 1, 1e-2: 2, 0.1: 3, 0.3: 4, 0.5: 5}[norm]
    leaf = s.clone().requires_grad_()
    product = cayley(leaf, "exact", series_ok=True, factors=factors)
    ref_leaf = s.double().requires_grad_()
    solved = torch.linalg.solve(torch.eye(32, dtype=torch.float64) - ref_leaf, torch.eye(32) + ref_leaf)
    torch.testing.assert_close(product, solved.float(), atol=1e-6, rtol=0)
    grad = torch.randn(16, 32, 32)
    product.backward(grad)
    solved.backward(grad.double())
    torch.testing.assert_close(leaf.grad, ref_leaf.grad.float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="doubling product"):
        series_factors(0.6)


@pytest.mark.parametrize("with_weight", [True, False], ids=["linear", "identity"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_thin_update_nodes_have_the_gradients_of_plain_autograd(with_weight, with_bias):
    """The hand-written thin-update nodes (in-place update, transposed thin gradients) against
    numerical gradients in float64."""
    from diffusion_oft.methods.nodes import _FrozenThinProduct, thin_update_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(7, 12, dtype=torch.float64, generator=g) if with_weight else None
    d_out = 7 if with_weight else 12
    bias = torch.randn(d_out, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    left = torch.randn(12, 3, dtype=torch.float64, generator=g, requires_grad=True)
    right = torch.randn(d_out, 3, dtype=torch.float64, generator=g, requires_grad=True)
    out = thin_update_linear(x, weight, bias, left, right)
    plain = x if weight is None else x @ weight.T
    reference = plain + (x @ left) @ right.T + (0 if bias is None else bias)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    inputs = [t for t in (x, bias, left, right) if t is not None]
    assert torch.autograd.gradcheck(lambda *a: thin_update_linear(*_rebuild(a, weight, bias)), inputs)
    frozen = torch.randn(9, 12, dtype=torch.float64, generator=g)
    thin = torch.randn(9, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: _FrozenThinProduct.apply(frozen.t(), v), (thin,))  # W^T V
    assert torch.autograd.gradcheck(lambda v: _FrozenThinProduct.apply(frozen, v), (left,))  # W V


def _rebuild(args, weight, bias):
    x, *rest = args
    b = rest.pop(0) if bias is not None else None
    return x, weight, b, rest[0], rest[1]


def _dense_ether_plus(method, side: str) -> torch.Tensor:
    """BlockDiag(I - u^u^T + v^v^T) from a method's (n, b) vectors, differentiably (float64)."""
    u, v = (getattr(method, f"{name}_{side}").double() for name in ("u", "v"))
    u, v = u / u.norm(dim=-1, keepdim=True), v / v.norm(dim=-1, keepdim=True)
    blocks = torch.eye(u.shape[-1], dtype=torch.float64) - u[:, :, None] * u[:, None] + v[:, :, None] * v[:, None]
    return torch.block_diag(*blocks)


@pytest.mark.parametrize(
    "tokens,x_grad",
    [(4, False), (40, False), (40, True), (4, True)],
    ids=["text-kv:output-on-y", "fused-both-sides", "fused-image-tokens", "activations"],
)
def test_ether_plus_routes_match_the_dense_reference_with_gradients(tokens, x_grad):
    """Every route ETHER+ takes in training (both sides folded into the thin matrices, the output side
    on y for few tokens without input gradient, both on the activations) has the value and the
    gradients of x (H_out W H_in)^T + b computed with dense matrices."""
    from diffusion_oft.methods.transforms import low_rank_on_weight, output_side_on_activations

    torch.manual_seed(0)
    cfg = AdapterConfig(method="ether_plus", num_blocks=2, init="random")
    linear = nn.Linear(16, 24)
    layer = OrthoLinear(linear.requires_grad_(False))
    method = get_method_class("ether_plus")(16, 24, cfg)
    layer.add_adapter("a", method)
    x = torch.randn(2, tokens // 2, 16, requires_grad=x_grad)
    route = (low_rank_on_weight(x, linear.weight), output_side_on_activations(x, linear.weight))
    assert (
        route
        == {(4, False): (True, True), (40, False): (True, False), (40, True): (True, False), (4, True): (False, True)}[
            (tokens, x_grad)
        ]
    )
    upstream = torch.randn(2, tokens // 2, 24)
    out = layer(x)
    params = [method.u_in, method.v_in, method.u_out, method.v_out]
    grads = torch.autograd.grad(out, params + ([x] if x_grad else []), upstream)
    weight = _dense_ether_plus(method, "out") @ linear.weight.double() @ _dense_ether_plus(method, "in")
    ref = x.double() @ weight.T + linear.bias.double()
    ref_grads = torch.autograd.grad(ref, params + ([x] if x_grad else []), upstream.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for fast, slow in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(fast.double(), slow.double(), atol=1e-4, rtol=1e-4)
