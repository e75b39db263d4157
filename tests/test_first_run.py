"""A new user's first contact: the README's outputs are ignored by git, typo'd model paths fail at once,
no warnings about packages our commands do not use, one-line data warnings, reproducible default seeds."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from diffusion_oft.model_paths import looks_like_a_path, resolve_model_path

REPO = Path(__file__).resolve().parents[1]


def readme_output_paths() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = set(re.findall(r"--(?:output_dir|class_data_dir) ([A-Za-z0-9_][A-Za-z0-9_./-]*)", text))
    found |= set(re.findall(r" -o ([A-Za-z0-9_][A-Za-z0-9_./-]*)", text))
    # DST, OUT: placeholders of the usage lines; assets/: the shipped data, read, not written
    return sorted(p for p in found if not p.isupper() and not p.startswith("assets/"))


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_the_readme_outputs_are_ignored_by_git():
    paths = readme_output_paths()
    assert "toy-dreambooth" in paths and "toy-out" in paths  # the README's own commands were found
    for path in paths:
        probe = path + "/x.png" if "." not in path else path
        proc = subprocess.run(["git", "check-ignore", "-q", probe], cwd=REPO)
        assert proc.returncode == 0, f"{path} (an output of the README's commands) is not in .gitignore"


def test_path_like_model_names_that_do_not_exist_fail_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "assets").mkdir()
    for typo in ("assets/toy_sd", "./toy-sd", "/no/such/model", "a/b/c", "~/missing-model"):
        assert looks_like_a_path(typo)
        with pytest.raises(ValueError, match=r"^--model .*: no such folder$"):
            resolve_model_path(typo, "--model")
    # hub ids stay hub ids (the hub is asked later, by the loader)
    for hub_id in ("stable-diffusion-v1-5/stable-diffusion-v1-5", "org/name"):
        assert not looks_like_a_path(hub_id)
        assert resolve_model_path(hub_id) == hub_id
    with pytest.raises(ValueError, match="unknown built-in model"):
        resolve_model_path("builtin:tiny-sd4")


def test_cli_typo_in_the_model_path_is_one_line_before_loading(tmp_path, monkeypatch, capsys):
    from diffusion_oft.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "assets").mkdir()
    argv = ["generate", "--model", "assets/toy_sd", "--prompt", "x", "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["diffusion-oft generate: error: --model assets/toy_sd: no such folder"]
    train = [
        "train",
        "dreambooth",
        "--pretrained_model_name_or_path",
        "assets/toy_sd",
        "--instance_data_dir",
        str(REPO / "assets" / "subject"),
        "--instance_prompt",
        "a sks toy",
        "--output_dir",
        str(tmp_path / "t"),
        "--resolution",
        "64",
        "--report_to",
        "none",
    ]
    assert main(train) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("assets/toy_sd: no such folder")
    assert not (tmp_path / "t").exists()  # a failed start leaves no empty output folder


PROBE = """
import sys
if sys.argv[1] == "quiet":
    from diffusion_oft.console import setup_console
    setup_console()
from transformers import CLIPImageProcessor  # what diffusers' pipelines import
"""


@pytest.mark.slow  # end to end: subprocesses
@pytest.mark.skipif(
    __import__("importlib").util.find_spec("torchvision") is not None,
    reason="the warning is only given without torchvision",
)
def test_no_warnings_about_torchvision_from_our_commands():
    def stderr(mode: str) -> str:
        return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=REPO).stderr

    assert "torchvision" in stderr("plain")  # transformers' note, which the test would otherwise not see
    assert "torchvision" not in stderr("quiet")


def test_data_warnings_are_one_plain_line(tmp_path):
    from diffusion_oft.console import setup_console
    from diffusion_oft.training.data import BadDataWarning, list_images

    (tmp_path / "ok.png").write_bytes((REPO / "assets" / "subject" / "sks_0.png").read_bytes())
    (tmp_path / "notes.png").write_text("not an image")
    setup_console()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(list_images(tmp_path, "--instance_data_dir")) == 1
    (w,) = [c for c in caught if issubclass(c.category, BadDataWarning)]
    line = warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
    assert line.startswith("warning: --instance_data_dir") and "data.py" not in line and line.count("\n") == 1


def test_generate_has_a_reproducible_default_seed():
    from diffusion_oft.cli import build_parser

    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p"])
    assert args.seed == 0  # 000-seed0.png, 001-seed1.png, ... as the README says
