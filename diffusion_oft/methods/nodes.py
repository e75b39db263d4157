"""Autograd nodes of the training paths: a rotation folded into a frozen weight, thin (low-rank)
updates of a frozen linear, and the fused low-rank linear that composes them.  Each is one node with
a hand-written backward that never forms a weight gradient (the wrapped weight is frozen).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .placement import output_side_on_activations


class ThinFactors(Protocol):
    """A low-rank transform H = I + U V^T given by thin (d, r) U, V (``transforms.LowRankBlockTransform``)."""

    def thin(self, dtype: torch.dtype, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]: ...


def block_diag_right_mul(x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x (..., n*b) @ BlockDiag(blocks (n, b, b)) (or its transpose), one batched matmul."""
    n, b, _ = blocks.shape
    lead = x.shape[:-1]
    xb = x.reshape(-1, n, b).transpose(0, 1)  # (n, tokens, b)
    mats = blocks.transpose(-1, -2) if transpose else blocks
    return torch.bmm(xb, mats).transpose(0, 1).reshape(*lead, n * b)


class _RotatedWeightLinear(torch.autograd.Function):
    """(x @ BlockDiag(R)) @ W^T + bias for a frozen W, computed as x @ (W @ BlockDiag(R)^T)^T + bias.

    Forward: the rotation goes onto the weight (d_out * d_in * b multiply-adds) instead of the
    activations (tokens * d_in * b, plus two transposing copies of x), then one plain GEMM.
    Backward: never forms a weight gradient (W is frozen): gz = g @ W, gx = gz @ BlockDiag(R)^T,
    dR_k = x_k^T gz_k per block — the same products the activation-side path does.
    x (..., n*b), blocks (n, b, b), weight (d_out, n*b), bias (d_out,) or None.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, blocks: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(x, blocks, weight)
        return F.linear(x, block_diag_right_mul(weight, blocks, transpose=True), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, blocks, weight = ctx.saved_tensors
        n, b, _ = blocks.shape
        gz = grad.reshape(-1, grad.shape[-1]) @ weight  # (tokens, d_in): the gradient at x @ BlockDiag(R)
        gx = gblocks = gbias = None
        if ctx.needs_input_grad[3]:
            gbias = grad.reshape(-1, grad.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
            gx = block_diag_right_mul(gz, blocks, transpose=True).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            xb = x.reshape(-1, n, b).transpose(0, 1)  # (n, tokens, b)
            gzb = gz.reshape(-1, n, b).transpose(0, 1)
            gblocks = torch.bmm(xb.transpose(1, 2), gzb)  # (n, b, b)
        return gx, gblocks, None, gbias


class _ThinUpdateLinear(torch.autograd.Function):
    """y = x W^T + bias + (x L) R^T for a frozen W (or y = x + bias + (x L) R^T when W is None):
    a frozen linear or the identity plus a thin update of rank r, as one autograd node.

    The products are those autograd would run, but the update is added to y in place (no copy of
    y) and the thin gradients are formed as (r, d) products and transposed: (gP^T x)^T instead of
    x^T gP, the faster orientation for thin CPU GEMMs (about 1.5-2x at T = 256-4096).
    x (T, d_in), weight (d_out, d_in) or None, bias (d_out,) or None, left L (d_in, r), right R (d_out, r).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, left, right):
        if weight is None:
            y = x.clone() if bias is None else x + bias
        else:
            y = F.linear(x, weight, bias)
        p = x @ left  # (T, r)
        y.addmm_(p, right.t())
        ctx.save_for_backward(x, weight, left, right, p)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, left, right, p = ctx.saved_tensors
        need_x, _, need_bias, need_left, need_right = ctx.needs_input_grad
        gx = gbias = gleft = gright = None
        gp = grad @ right if need_x or need_left else None  # (T, r): the gradient at x L
        if need_x:
            gx = (grad @ weight if weight is not None else grad.clone()).addmm_(gp, left.t())
        if need_bias:
            gbias = grad.sum(0)
        if need_left:
            gleft = (gp.t() @ x).t()  # (d_in, r)
        if need_right:
            gright = (p.t() @ grad).t()  # (d_out, r)
        return gx, None, gbias, gleft, gright


class _FrozenThinProduct(torch.autograd.Function):
    """W @ V for a frozen W (a, b) and a thin V (b, r), returned as (a, r).  Both this product and its
    gradient W^T G are formed as (r, .) products and transposed, the faster orientation for thin
    CPU GEMMs (about 2x for the (1280, 768) weights of SD's text K/V)."""

    @staticmethod
    def forward(ctx, weight, thin):
        ctx.save_for_backward(weight)
        return (thin.t() @ weight.t()).t()

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return None, (grad.t() @ weight).t()


def thin_update_linear(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, left: torch.Tensor, right: torch.Tensor
) -> torch.Tensor:
    """x (..., d_in) -> x W^T + bias + (x L) R^T (W frozen; None: the identity), one autograd node.
    Under autocast (mixed dtypes) it falls back to plain ops."""
    x2 = x.reshape(-1, x.shape[-1])
    if torch.is_autocast_enabled(x.device.type) or (weight is not None and weight.requires_grad):
        y = x2 if weight is None else F.linear(x2, weight)
        y = torch.addmm(y if bias is None else y + bias, x2 @ left, right.t())
    else:
        y = _ThinUpdateLinear.apply(x2, weight, bias, left, right)
    return y.view(*x.shape[:-1], y.shape[-1])


def fused_low_rank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    t_in: ThinFactors | None,
    t_out: ThinFactors | None,
) -> torch.Tensor:
    """y = x (H_out W H_in)^T + bias for low-rank transforms on one or both sides, as a LoRA:
    y = x W^T + b + (x L) R^T with thin L (d_in, r) and R (d_out, r) made from the weight.

    With H_in = I + U V^T and H_out^T = I + V' U'^T (y -> y H_out^T on the output):
        y = x W^T + b + (x U)(W V)^T + (x W^T V') U'^T + (x U)(V^T W^T V') U'^T,
    so L = [U, W^T V'] and R = [W V + U' G^T, U'] with G = V^T W^T V'.  The activations see two
    passes (x L, then one addmm into y) forward, as with a LoRA of rank r; the rest is weight-sized.

    With few tokens (``output_side_on_activations``: text K/V) the output side is applied to y
    instead, y -> y + (y V') U'^T: token-sized products in place of W^T V' and its gradient W dP,
    two weight-sized passes.
    """
    if t_out is not None and output_side_on_activations(x, weight):
        y = F.linear(x, weight) if t_in is None else fused_low_rank_linear(x, weight, None, t_in, None)
        v_out, u_out = t_out.thin(x.dtype, transpose=True)  # H_out^T = I + V' U'^T
        return thin_update_linear(y, None, bias, v_out, u_out)  # y H_out^T + bias, the bias in the same pass
    dtype = x.dtype
    left, right = [], []
    if t_in is not None:
        u, v = t_in.thin(dtype)  # (d_in, r1) each
        left.append(u)
        right_u = _FrozenThinProduct.apply(weight, v)  # W V: (d_out, r1)
    if t_out is not None:
        u_out, v_out = t_out.thin(dtype)  # (d_out, r2) each
        wt_v = _FrozenThinProduct.apply(weight.t(), v_out)  # W^T V': (d_in, r2)
        left.append(wt_v)
        if t_in is not None:
            right_u = right_u + u_out @ (v.t() @ wt_v).t()  # + U' G^T
    if t_in is not None:
        right.append(right_u)
    if t_out is not None:
        right.append(u_out)
    thin_left = torch.cat(left, dim=1) if len(left) > 1 else left[0]
    thin_right = torch.cat(right, dim=1) if len(right) > 1 else right[0]
    return thin_update_linear(x, weight, bias, thin_left, thin_right)
