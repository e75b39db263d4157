"""Reliability: fragile numerics (Neumann series range, autocast precision, non-finite losses)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import METHOD_CONFIGS, make_tiny_unet
from safetensors.torch import load_file
from training_helpers import make_subject_images

import diffusion_oft as do
import diffusion_oft.methods.boft as boft
from diffusion_oft.layers import OrthoLinear
from diffusion_oft.methods.cayley import cayley
from diffusion_oft.tiny import save_tiny_sd
from diffusion_oft.training.checkpoints import checkpoint_problem
from diffusion_oft.training.dreambooth import DreamBoothTrainer
from diffusion_oft.training.dreambooth import main as train_main
from diffusion_oft.training.loop import NonFiniteLossError


def neumann_layer(method: str = "oft") -> tuple[torch.nn.Module, OrthoLinear]:
    unet = make_tiny_unet()
    do.add_adapter(unet, do.AdapterConfig(**METHOD_CONFIGS[method], cayley_mode="neumann", neumann_terms=3))
    layer = next(m for m in unet.modules() if isinstance(m, OrthoLinear))
    return unet, layer


def modes_used(layer: OrthoLinear, monkeypatch) -> list[str]:
    """The Cayley modes the layer's transforms were built with (spying on boft.cayley)."""
    seen = []

    def spy(skew, mode="exact", neumann_terms=5, **kwargs):
        seen.append(mode)
        return cayley(skew, mode, neumann_terms, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(boft, "cayley", spy)
        layer._transforms("default")
    return seen


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_neumann_falls_back_to_exact_cayley_outside_convergence(method, caplog, monkeypatch):
    monkeypatch.setattr(boft, "_neumann_warned", False)
    _, layer = neumann_layer(method)
    adapter = layer.ortho_adapters["default"]
    with torch.no_grad():
        adapter.skew.normal_(std=0.01)  # |S|_F << 1: the series is used
    assert modes_used(layer, monkeypatch) == ["neumann"]

    with caplog.at_level(logging.WARNING, logger="diffusion_oft"), torch.no_grad():
        adapter.skew.mul_(400.0)  # in place, like an optimizer step: |S|_F >> 1
        assert adapter.skew_matrices().flatten(-2).norm(dim=-1).max() > 1
        assert modes_used(layer, monkeypatch) == ["exact"]
        dense = next(iter(layer._transforms("default")[0].values())).to_dense()
        torch.testing.assert_close(dense @ dense.T, torch.eye(dense.shape[0]), atol=1e-4, rtol=0)  # orthogonal
        adapter.skew.mul_(2.0)
        assert modes_used(layer, monkeypatch) == ["exact"]
    warnings = [r for r in caplog.records if "region of convergence" in r.getMessage()]
    assert len(warnings) == 1  # logged once per process

    with torch.no_grad():
        adapter.skew.mul_(1e-5)  # back inside: the series again
    assert modes_used(layer, monkeypatch) == ["neumann"]


def test_neumann_kept_when_only_the_cheap_bound_fails(monkeypatch):
    """|S|_F >= 1 but |S|_2 < 1: the series converges, so it is kept (PEFT files rely on that)."""
    from diffusion_oft.methods.cayley import triu_from_skew

    _, layer = neumann_layer()
    adapter = layer.ortho_adapters["default"]
    pairs = torch.zeros(8, 8)
    for i in range(0, 8, 2):
        pairs[i, i + 1], pairs[i + 1, i] = 0.6, -0.6  # four 2x2 rotations: |S|_2 = 0.6, |S|_F = 1.7
    with torch.no_grad():
        adapter.skew.copy_(triu_from_skew(pairs).expand_as(adapter.skew))
    assert adapter.skew_matrices().flatten(-2).norm(dim=-1).min() > 1
    assert modes_used(layer, monkeypatch) == ["neumann"]


def test_neumann_check_is_refreshed_by_apply_constraints(monkeypatch):
    """Compiled forwards reuse the cached answer: apply_constraints (eager, after each optimizer
    step) keeps it current."""
    monkeypatch.setattr(boft, "_neumann_warned", False)
    unet, layer = neumann_layer()
    adapter = layer.ortho_adapters["default"]
    do.apply_constraints(unet)
    assert adapter._neumann_check[1] is True
    with torch.no_grad():
        adapter.skew.fill_(1.0)
    do.apply_constraints(unet)
    assert adapter._neumann_check[1] is False
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert modes_used(layer, monkeypatch) == ["exact"]  # the cached answer, no host sync


def test_neumann_fallback_keeps_gradients():
    _, layer = neumann_layer()
    adapter = layer.ortho_adapters["default"]
    with torch.no_grad():
        adapter.skew.fill_(1.0)
    x = torch.randn(3, layer.base_layer.in_features)
    layer.train()
    layer(x).square().sum().backward()
    assert adapter.skew.grad is not None and torch.isfinite(adapter.skew.grad).all()


@pytest.mark.parametrize(
    "method, mode", [(m, "exact") for m in METHOD_CONFIGS] + [("oft", "neumann"), ("boft", "neumann")]
)
def test_transforms_are_float32_under_bf16_autocast(method, mode):
    extra = {"cayley_mode": mode} if method in ("oft", "boft") else {}
    unet = make_tiny_unet()
    do.add_adapter(unet, do.AdapterConfig(**METHOD_CONFIGS[method], **extra, init="random"))
    layer = next(m for m in unet.modules() if isinstance(m, OrthoLinear))
    reference = {k: t.to_dense() for k, t in layer._transforms("default")[0].items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        built = layer._transforms("default")[0]
        tensors = [v for t in built.values() for v in vars(t).values() if isinstance(v, torch.Tensor)]
        assert tensors and all(t.dtype == torch.float32 for t in tensors)
        x = torch.randn(2, 5, layer.base_layer.in_features)
        out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    for key, transform in built.items():
        assert torch.equal(transform.to_dense(), reference[key])  # same numbers as without autocast


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model = save_tiny_sd(tmp_path / "tiny-sd")
    data = make_subject_images(tmp_path / "subject", n=2)
    out = tmp_path / "run"
    original = DreamBoothTrainer.compute_loss

    def poisoned(self, batch, generator):
        loss, logs = original(self, batch, generator)
        return (loss * float("nan"), logs) if self.global_step == 3 else (loss, logs)

    monkeypatch.setattr(DreamBoothTrainer, "compute_loss", poisoned)
    argv = [
        "--pretrained_model_name_or_path",
        str(model),
        "--instance_data_dir",
        str(data),
        "--instance_prompt",
        "a photo of sks disc",
        "--output_dir",
        str(out),
        "--resolution",
        "16",
        "--report_to",
        "none",
        "--max_train_steps",
        "6",
        "--checkpointing_steps",
        "2",
        "--seed",
        "3",
        "--learning_rate",
        "1e-3",
    ]
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite loss \(nan\) at step 4.*last good checkpoint is .*"
        r"checkpoint-2.*--resume_from_checkpoint latest",
    ) as info:
        train_main(argv)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert checkpoint_problem(out / "checkpoint-2") is None
    tensors = load_file(str(out / "checkpoint-2" / "adapter.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert not (out / "adapter.safetensors").exists()  # no final adapter from a broken run

    # resuming from the kept checkpoint works (the loss is fine again)
    monkeypatch.setattr(DreamBoothTrainer, "compute_loss", original)
    result = train_main([*argv, "--resume_from_checkpoint", "latest"])
    assert result["global_step"] == 6 and (out / "adapter.safetensors").is_file()
