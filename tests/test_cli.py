"""The `goose` command line."""
import subprocess

import pytest
import sys

from goose.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "goose.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("info", "train", "bench"):
        assert command in out.stdout


@pytest.mark.slow
def test_unknown_command_fails():
    out = run("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_info_describes_a_checkpoint(tiny_pth, capsys):
    assert main(["info", str(tiny_pth)]) == 0
    text = capsys.readouterr().out
    assert "layers 3" in text and "vocab 777" in text and "MiB" in text


def test_info_reports_bad_files(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.pth")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_info_reads_the_config_file(tmp_path, tiny_pth, capsys):
    cfg = tmp_path / "goose.yaml"
    cfg.write_text(f"model:\n  path: {tiny_pth}\n  strategy: cpu bf16\n")
    assert main(["info", "--config", str(cfg)]) == 0
    assert "strategy  cpu bf16" in capsys.readouterr().out


def test_info_reports_config_errors(tmp_path, capsys):
    cfg = tmp_path / "goose.yaml"
    cfg.write_text("model:\n  pth: x\n")
    assert main(["info", "--config", str(cfg)]) == 1
    assert "unknown key model.pth" in capsys.readouterr().err
