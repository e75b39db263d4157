"""LoRA exports (``--to lora``: diffusers' layout, ``--to kohya-lora``: kohya's), read back by diffusers'
own loader (``load_lora_weights``, ``set_adapters``, ``fuse_lora``) and compared with our merged model."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from conftest import run_unet
from safetensors import safe_open
from safetensors.torch import load_file

import diffusion_oft as do
from diffusion_oft.cli import main
from diffusion_oft.convert import ConversionError, convert, kohya_name
from diffusion_oft.convert.lora import LORA_WEIGHTS_NAME, choose_rank
from diffusion_oft.tiny import save_tiny_sd, tiny_sd_pipeline, tiny_sdxl_pipeline

# Our merged model and diffusers' LoRA both compute W' in float32 from float64 products, rounded
# differently (W' once vs W + B A with float32 factors): equal to float32 rounding, not bit for bit.
EXACT = 1e-5

CASES = {
    "oft": dict(method="oft", block_size=8),
    "oft_output": dict(method="oft", block_size=8, side="output"),
    "oft_output_magnitude": dict(method="oft", block_size=8, side="output", magnitude=True),
    "boft": dict(method="boft", block_size=4, n_butterfly_factors=2),
    "boft_output": dict(method="boft", block_size=4, n_butterfly_factors=2, side="output"),
    "ether": dict(method="ether", num_blocks=2),
    "ether_output": dict(method="ether", num_blocks=2, side="output"),
    "ether_plus": dict(method="ether_plus", num_blocks=2),  # two-sided
    "ether_plus_input": dict(method="ether_plus", num_blocks=2, ether_plus_two_sided=False),
    "ether_plus_output": dict(method="ether_plus", num_blocks=2, ether_plus_two_sided=False, side="output"),
}
STRUCTURAL = ("ether", "ether_plus")


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("diffusers").setLevel(logging.ERROR)  # "no LoRA keys for the text encoder" notes


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("lora") / "base")


def load_pipe(base_dir):
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(str(base_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trained(module: torch.nn.Module, config: dict, seed: int = 3, std: float = 0.3) -> None:
    """An adapter moved away from its init as training would (magnitudes around 1)."""
    do.add_adapter(module, do.AdapterConfig(**config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.1 if name.endswith("magnitude") else std))


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def layer_errors(path) -> dict[str, float]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["diffusion_oft.layer_errors"])


def weight_errors(lora_pipe, merged_unet, base_unet) -> dict[str, float]:
    """Per layer ||W_lora - W'||_F / ||W' - W||_F from the LoRA-fused UNet's weights."""
    out = {}
    for path, layer in do.model.named_ortho_layers(merged_unet):
        want = layer.base_layer.weight.double()
        base = base_unet.get_submodule(path).weight.double()
        got = lora_pipe.unet.get_submodule(path)
        got = (got.base_layer if hasattr(got, "base_layer") else got).weight.double()
        out[f"unet.{path}"] = ((got - want).norm() / (want - base).norm()).item()
    return out


# Output-side cases run with the slow tests (CI); the default run has every method on its default side.
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if "output" in c else c for c in CASES])
def test_lora_export_loads_in_diffusers_and_matches_the_merged_model(tmp_path, base_dir, unet_inputs, case):
    config = CASES[case]
    ours = load_pipe(base_dir)
    trained(ours.unet, config)
    do.save_adapter(ours.unet, tmp_path / "adapter.safetensors")
    do.merge_adapter(ours.unet)
    merged = run_unet(ours.unet, unet_inputs)
    base_unet = load_pipe(base_dir).unet
    base_out = run_unet(base_unet, unet_inputs)
    printed = []
    out = convert(tmp_path / "adapter.safetensors", "lora", tmp_path / "lora", model=base_dir, log=printed.append)
    assert out == tmp_path / "lora" / LORA_WEIGHTS_NAME
    text = printed[0]
    assert "total: 32 layers" in text and "MiB" in text
    errors = layer_errors(out)
    structural = config["method"] in STRUCTURAL and not config.get("magnitude")

    pipe = load_pipe(base_dir)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    got = run_unet(pipe.unet, unet_inputs)
    change = (merged - base_out).abs().max().item()
    err = (got - merged).abs().max().item()
    print(
        f"\n{case}: max rel error per layer {max(errors.values()):.4f}; UNet output vs merged: {err:.2e} abs, "
        f"{err / merged.abs().max().item():.2e} of the output, {err / change:.2e} of the adapter's change"
    )
    if structural:
        assert "exact" in text and max(errors.values()) == 0.0
        assert rel(got, merged) <= EXACT
    else:
        assert "error max" in text and 0 < max(errors.values()) <= 0.05
        # output error ~ the per-layer weight error (5 % of the change): a loose bound, 2x
        assert err <= 2 * 0.05 * change
        pipe.fuse_lora()
        measured = weight_errors(pipe, ours.unet, base_unet)
        for key, value in measured.items():  # the printed error is the weight error diffusers gets
            assert abs(value - errors[key]) <= 1e-4, key

        # full rank: exact
        convert(tmp_path / "adapter.safetensors", "lora", tmp_path / "full.safetensors", model=base_dir, max_error=0.0)
        assert max(layer_errors(tmp_path / "full.safetensors").values()) <= 1e-6
        pipe = load_pipe(base_dir)
        pipe.load_lora_weights(str(tmp_path / "full.safetensors"))
        assert rel(run_unet(pipe.unet, unet_inputs), merged) <= EXACT

    # set_adapters / fuse_lora of diffusers
    pipe = load_pipe(base_dir)
    source = tmp_path / ("lora" if structural else "full.safetensors")
    pipe.load_lora_weights(str(source), adapter_name="ortho")
    pipe.set_adapters(["ortho"], adapter_weights=[1.0])
    assert rel(run_unet(pipe.unet, unet_inputs), merged) <= EXACT
    pipe.set_adapters(["ortho"], adapter_weights=[0.0])
    assert rel(run_unet(pipe.unet, unet_inputs), base_out) <= 1e-6
    pipe.set_adapters(["ortho"], adapter_weights=[1.0])
    pipe.fuse_lora(adapter_names=["ortho"])
    pipe.unload_lora_weights()
    assert rel(run_unet(pipe.unet, unet_inputs), merged) <= EXACT


def test_rank_and_max_error_select_the_truncated_svd(tmp_path, base_dir):
    ours = load_pipe(base_dir)
    trained(ours.unet, CASES["oft"])
    do.save_adapter(ours.unet, tmp_path / "oft.safetensors")
    convert(tmp_path / "oft.safetensors", "lora", tmp_path / "r4.safetensors", model=base_dir, rank=4)
    state = load_file(tmp_path / "r4.safetensors")
    assert {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")} == {4}
    loose = max(layer_errors(tmp_path / "r4.safetensors").values())
    convert(tmp_path / "oft.safetensors", "lora", tmp_path / "e.safetensors", model=base_dir, max_error=0.2)
    errors = layer_errors(tmp_path / "e.safetensors")
    assert max(errors.values()) <= 0.2 < loose
    # choose_rank: the smallest rank within the error, from the singular values
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert choose_rank(s, None, 0.0) == (3, 0.0)
    r, e = choose_rank(s, None, 0.3)
    assert r == 2 and abs(e - (1 / 14) ** 0.5) < 1e-12
    assert choose_rank(s, 1, None)[0] == 1
    # ETHER: exact at the structure's rank (n blocks of one vector: rank 2 here), and --rank cuts it
    ether = load_pipe(base_dir)
    trained(ether.unet, CASES["ether"])
    do.save_adapter(ether.unet, tmp_path / "ether.safetensors")
    convert(tmp_path / "ether.safetensors", "lora", tmp_path / "ether_lora.safetensors", model=base_dir)
    ranks = {v.shape[0] for k, v in load_file(tmp_path / "ether_lora.safetensors").items() if "lora_A" in k}
    assert ranks == {2}
    convert(tmp_path / "ether.safetensors", "lora", tmp_path / "ether_r1.safetensors", model=base_dir, rank=1)
    assert 0 < max(layer_errors(tmp_path / "ether_r1.safetensors").values()) < 1


def test_text_encoder_adapters_through_load_lora_weights(tmp_path, base_dir, unet_inputs):
    ours = load_pipe(base_dir)
    trained(ours.unet, CASES["ether_plus"])
    # all four projections: diffusers' kohya reader (for kohya-lora below) tells its old key format apart
    # from PEFT's by the out_proj keys, and fails on a text-encoder LoRA without them (diffusers 0.42)
    te_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    trained(ours.text_encoder, dict(method="oft", block_size=8, target_modules=te_targets), seed=4)
    do.save_adapter(ours, tmp_path / "adapter.safetensors")
    ids = ours.tokenizer(["a photo"], return_tensors="pt").input_ids
    do.merge_adapter(ours.unet)
    do.merge_adapter(ours.text_encoder)
    with torch.no_grad():
        want_unet, want_text = run_unet(ours.unet, unet_inputs), ours.text_encoder(ids)[0]
    convert(tmp_path / "adapter.safetensors", "lora", tmp_path / "lora", model=base_dir, max_error=0.0)
    keys = load_file(tmp_path / "lora" / LORA_WEIGHTS_NAME).keys()
    te_key = next(k for k in keys if k.startswith("text_encoder."))
    assert te_key.endswith(".lora_A.weight") or te_key.endswith(".lora_B.weight")
    pipe = load_pipe(base_dir)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        assert rel(pipe.text_encoder(ids)[0], want_text) <= EXACT
    assert rel(run_unet(pipe.unet, unet_inputs), want_unet) <= EXACT
    # the same file through diffusers' kohya reader: kohya-lora
    convert(tmp_path / "adapter.safetensors", "kohya-lora", tmp_path / "k.safetensors", model=base_dir, max_error=0.0)
    pipe = load_pipe(base_dir)
    pipe.load_lora_weights(str(tmp_path / "k.safetensors"))
    with torch.no_grad():
        assert rel(pipe.text_encoder(ids)[0], want_text) <= EXACT
    assert rel(run_unet(pipe.unet, unet_inputs), want_unet) <= EXACT


def test_sdxl_text_encoders_through_load_lora_weights(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = tiny_sdxl_pipeline()
    trained(pipe.unet, CASES["boft_output"])
    for i, comp in enumerate(("text_encoder", "text_encoder_2")):
        te_config = dict(method="ether_plus", num_blocks=2, target_modules=("q_proj", "k_proj", "v_proj", "out_proj"))
        trained(getattr(pipe, comp), te_config, seed=7 + i)
    do.save_adapter(pipe, tmp_path / "adapter.safetensors")
    ids = pipe.tokenizer(["a photo"], return_tensors="pt").input_ids
    for comp in ("text_encoder", "text_encoder_2"):
        do.remove_adapter(getattr(pipe, comp))
    do.remove_adapter(pipe.unet)
    convert(tmp_path / "adapter.safetensors", "lora", tmp_path / "lora", model=pipe, max_error=0.0)
    keys = load_file(tmp_path / "lora" / LORA_WEIGHTS_NAME).keys()
    assert any(k.startswith("text_encoder_2.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    ours = tiny_sdxl_pipeline()
    do.load_adapter(ours, tmp_path / "adapter.safetensors")
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        do.merge_adapter(getattr(ours, comp))
    theirs = tiny_sdxl_pipeline()
    assert isinstance(theirs, StableDiffusionXLPipeline)
    theirs.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        for comp in ("text_encoder", "text_encoder_2"):
            want = getattr(ours, comp)(ids, output_hidden_states=True).hidden_states[-2]
            got = getattr(theirs, comp)(ids, output_hidden_states=True).hidden_states[-2]
            assert rel(got, want) <= EXACT, comp


@pytest.mark.parametrize("sdxl", [False, True])
def test_kohya_lora_keys_and_shapes(tmp_path, sdxl):
    pipe = tiny_sdxl_pipeline() if sdxl else tiny_sd_pipeline()
    comps = ["unet", "text_encoder", "text_encoder_2"] if sdxl else ["unet", "text_encoder"]
    trained(pipe.unet, CASES["oft"])
    for i, comp in enumerate(comps[1:]):
        trained(
            getattr(pipe, comp), dict(method="ether", num_blocks=2, target_modules=("q_proj", "v_proj")), seed=5 + i
        )
    do.save_adapter(pipe, tmp_path / "adapter.safetensors")
    layers = {c: dict(do.model.named_ortho_layers(getattr(pipe, c))) for c in comps}
    do.remove_adapter(pipe.unet)
    for comp in comps[1:]:
        do.remove_adapter(getattr(pipe, comp))
    convert(tmp_path / "adapter.safetensors", "kohya-lora", tmp_path / "k.safetensors", model=pipe, rank=3)
    state = load_file(tmp_path / "k.safetensors")
    prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_" if sdxl else "lora_te_",
        "text_encoder_2": "lora_te2_",
    }
    expected = set()
    for comp, paths in layers.items():
        for path, layer in paths.items():
            name = kohya_name(comp, path, comps)
            assert name.startswith(prefixes[comp])
            if comp != "unet":
                assert name.startswith(prefixes[comp] + "text_model_encoder_layers_")
            expected |= {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
            r = 3 if comp == "unet" else 2  # ETHER on the text encoders: exact at rank n = 2 (< 3)
            assert state[f"{name}.lora_down.weight"].shape == (r, layer.in_features)
            assert state[f"{name}.lora_up.weight"].shape == (layer.out_features, r)
            assert state[f"{name}.alpha"].shape == () and state[f"{name}.alpha"].item() == r  # scale alpha / r = 1
    assert set(state) == expected
    with safe_open(str(tmp_path / "k.safetensors"), framework="pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora"


def test_info_names_lora_files_and_load_adapter_refuses_them(tmp_path, base_dir, capsys):
    ours = load_pipe(base_dir)
    trained(ours.unet, CASES["ether"])
    do.save_adapter(ours.unet, tmp_path / "ether.safetensors")
    assert (
        main(
            [
                "convert",
                str(tmp_path / "ether.safetensors"),
                "--to",
                "lora",
                "-o",
                str(tmp_path / "lora"),
                "--model",
                str(base_dir),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "unet attn1.to_q: 4 layers, rank 2, exact" in printed and "file size" in printed
    assert (
        main(
            [
                "convert",
                str(tmp_path / "ether.safetensors"),
                "--to",
                "kohya-lora",
                "-o",
                str(tmp_path / "k.safetensors"),
                "--model",
                str(base_dir),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["info", str(tmp_path / "lora")]) == 0
    printed = capsys.readouterr().out
    assert "LoRA, diffusers layout" in printed and "from unet: ether" in printed and str(base_dir) in printed
    assert main(["info", str(tmp_path / "k.safetensors")]) == 0
    assert "LoRA, kohya layout" in capsys.readouterr().out
    for path in (tmp_path / "lora" / LORA_WEIGHTS_NAME, tmp_path / "lora", tmp_path / "k.safetensors"):
        with pytest.raises(do.AdapterFileError, match="a LoRA file .* not an orthogonal adapter: load it with"):
            do.load_adapter(load_pipe(base_dir), path)
    assert main(["convert", str(tmp_path / "ether.safetensors"), "--to", "lora", "-o", str(tmp_path / "x")]) == 2
    assert "--to lora needs the base model" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_diff_from_a_half_precision_folder_loads_in_its_dtype(tmp_path, unet_inputs, dtype):
    """--to diff from an fp16 / bf16 folder: float32 deltas (not float64) that reproduce the merged weights."""
    from conftest import make_tiny_unet
    from diffusers import UNet2DConditionModel

    make_tiny_unet().to(dtype).save_pretrained(str(tmp_path / "unet"))
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"), torch_dtype=dtype)
    trained(unet, CASES["oft_output_magnitude"])
    do.save_adapter(unet, tmp_path / "a.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        convert(tmp_path / "a.safetensors", "diff", tmp_path / "d.safetensors", model=tmp_path / "unet")
    diff = load_file(tmp_path / "d.safetensors")
    assert {v.dtype for v in diff.values()} == {torch.float32}
    do.merge_adapter(unet)
    base = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"), torch_dtype=dtype)
    for path, layer in do.model.named_ortho_layers(unet):
        weight = base.get_submodule(path).weight
        applied = (weight.float() + diff[f"{kohya_name('unet', path)}.diff"]).to(dtype)
        if dtype == torch.float16:
            assert torch.equal(applied, layer.base_layer.weight), path
        else:  # bf16: a merged weight near 0 beside a large W needs more than float32's 24 bits in M - W
            assert (applied.float() - layer.base_layer.weight.float()).abs().max() <= 2**-20 * weight.abs().max()


@pytest.mark.slow  # end to end: the command line
def test_side_output_from_the_cli_exports_to_kohya_read_back_exactly(tmp_path, base_dir, unet_inputs):
    """`train dreambooth --side output` -> `convert --to kohya` -> our loader (bit for bit) and LyCORIS (exact)."""
    from test_convert_kohya import TOL, LycorisNetworkKohya, create_network_from_weights
    from training_helpers import make_subject_images

    from diffusion_oft.training.args import adapter_config_from_args, control_parser

    data = make_subject_images(tmp_path / "subject", n=2)
    out = tmp_path / "run"
    flags = [
        "--pretrained_model_name_or_path",
        str(base_dir),
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
        "--method",
        "oft",
        "--block_size",
        "4",
        "--side",
        "output",
        "--max_train_steps",
        "3",
        "--learning_rate",
        "5e-2",
        "--checkpointing_steps",
        "100",
    ]
    assert main(["train", "dreambooth", *flags]) == 0
    adapter = out / "adapter.safetensors"
    assert do.adapter_info(adapter)["components"]["unet"]["config"]["side"] == "output"
    assert main(["convert", str(adapter), "--to", "kohya", "-o", str(tmp_path / "k.safetensors")]) == 0

    trained_unet = load_pipe(base_dir).unet
    do.load_adapter(trained_unet, adapter)
    want = run_unet(trained_unet, unet_inputs)
    ours = load_pipe(base_dir).unet
    do.load_adapter(ours, tmp_path / "k.safetensors")
    assert torch.equal(run_unet(ours, unet_inputs), want)

    saved = (LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE, LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME)
    LycorisNetworkKohya.apply_preset({"unet_target_module": ["Transformer2DModel"], "unet_target_name": []})
    try:
        base = load_pipe(base_dir).unet
        network, _ = create_network_from_weights(
            1.0, str(tmp_path / "k.safetensors"), None, None, base, for_inference=True
        )
    finally:
        LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE, LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME = saved
    assert len(network.unet_loras) == 32
    for module in network.unet_loras:
        module.apply_to()
    assert (run_unet(base, unet_inputs) - want).abs().max().item() <= TOL

    # an input-side adapter: the refusal names the flag
    unet = load_pipe(base_dir).unet
    trained(unet, dict(method="oft", block_size=4))
    do.save_adapter(unet, tmp_path / "in.safetensors")
    with pytest.raises(ConversionError, match="train with --side output"):
        convert(tmp_path / "in.safetensors", "kohya", tmp_path / "in_k.safetensors")
    # train control has the flag too
    args = control_parser().parse_args(["--pretrained_model_name_or_path", "x", "--side", "output", "--method", "boft"])
    assert args.side == "output"
    args.block_size, args.num_blocks, args.n_butterfly_factors, args.adapter_dropout = 4, None, 2, 0.0
    assert adapter_config_from_args(args).side == "output"
