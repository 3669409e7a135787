"""The command lines: ``vtp-train`` (vtp.cli) and ``python -m vtp.benchmark``. Help per command with defaults,
every argument checked before any work (argparse error, exit status 2, no traceback), the benchmark's CPU caveat,
tables printed once, and one clear line for a missing GPU. Nothing here trains or loads a model."""
import re
from pathlib import Path

import pytest
import torch

import vtp.benchmark as benchmark
from vtp import cli, train


@pytest.fixture
def no_work(monkeypatch):
    """Any training or teacher loading fails the test: validation must come first."""
    def forbidden(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    for name in ("train_teacher", "load_or_train_teacher", "train_pruner"):
        monkeypatch.setattr(train, name, forbidden)


def _exit(argv, capsys, main=cli.main):
    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


@pytest.mark.parametrize("command, options", [
    ("teacher", ["--mode", "--config", "--out"]),
    ("pruner", ["--mode", "--config", "--ratio", "--budgets", "--seed", "--out", "--checkpoint"]),
])
def test_each_command_has_its_own_help_with_defaults(command, options, capsys):
    code, out, _ = _exit([command, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: vtp-train {command}")
    for option in options:
        assert option in out
    assert "(default: " in out
    if command == "pruner":
        assert "(default: 0.25)" in out and "--out DIR" not in out
    else:
        assert "--ratio" not in out and "checkpoints/teacher_MODE" in out


def test_top_level_help_lists_the_commands(capsys):
    code, out, _ = _exit(["--help"], capsys)
    assert code == 0 and "teacher" in out and "pruner" in out


@pytest.mark.parametrize("argv, message", [
    (["pruner", "--ratio", "0"], r"--ratio: must be a keep ratio in \(0, 1\], got '0'"),
    (["pruner", "--ratio", "abc"], r"--ratio: must be a keep ratio"),
    (["pruner", "--budgets", "0.25", "1.5"], r"--budgets: must be a keep ratio in \(0, 1\], got '1.5'"),
    (["pruner", "--seed", "-1"], r"--seed: must be an int >= 0"),
    (["pruner", "--mode", "huge"], r"--mode: invalid choice: 'huge'"),
    (["pruner", "--config", "{bad"], r"--config: not valid JSON"),
    (["pruner", "--config", "[1]"], r"--config: must be a JSON object"),
    (["pruner", "--config", '{"min_temp": 0}'], r"min_temp must be a finite number >= 1e-06"),
    (["pruner", "--config", '{"temp_schedule": "foo"}'], r"temp_schedule must be one of"),
    (["pruner", "--config", '{"no_such_field": 1}'], r"unknown PrunerConfig field\(s\) \['no_such_field'\]"),
    (["teacher", "--config", '{"model": "huge"}'], r"model must be one of"),
    (["teacher", "--config", '{"steps": 0}'], r"steps must be a positive int"),
    (["pruner", "--out", "no/such/dir/summary.json"], r"--out: directory no/such/dir does not exist"),
    (["pruner", "--checkpoint", "no/such/dir/run.pt"], r"--checkpoint: directory no/such/dir does not exist"),
    (["teacher", "--out", "pyproject.toml"], r"--out: pyproject.toml exists and is not a directory"),
    ([], r"required: \{teacher,pruner\}|the following arguments are required"),
])
def test_bad_arguments_fail_at_once_with_exit_2(argv, message, capsys, no_work):
    code, _, err = _exit(argv, capsys)
    assert code == 2
    assert "Traceback" not in err
    assert re.search(message, err), err


def test_vtp_train_main_is_the_cli(capsys, no_work):
    code, _, err = _exit(["pruner", "--ratio", "0"], capsys, main=train.main)
    assert code == 2 and "--ratio" in err


def test_benchmark_cuda_without_cuda_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    code, out, err = _exit(["--device", "cuda"], capsys, main=benchmark.main)
    assert code == 2 and "Traceback" not in err
    assert "--device cuda: no CUDA GPU is visible" in err


@pytest.mark.parametrize("argv, message", [
    (["--ratios", "0"], r"--ratios: must be a keep ratio in \(0, 1\]"),
    (["--batches", "0"], r"--batches: must be an int >= 1"),
    (["--repeats", "0"], r"--repeats: must be an int >= 1"),
    (["--warmup", "-1"], r"--warmup: must be an int >= 0"),
    (["--device", "tpu"], r"--device: "),
    (["--smoke", "--full"], r"not allowed with argument"),
])
def test_benchmark_bad_arguments_exit_2(argv, message, capsys):
    code, _, err = _exit(argv, capsys, main=benchmark.main)
    assert code == 2 and "Traceback" not in err
    assert re.search(message, err), err


def test_benchmark_on_cpu_warns_and_prints_each_table_once(capsys):
    benchmark.main(["--smoke", "--device", "cpu", "--batches", "1", "--ratios", "1", "0.25", "--repeats", "1",
                    "--warmup", "0", "--no-decode"])
    out = capsys.readouterr().out
    assert "CPU" in out and "not meaningful" in out
    rows = [line for line in out.splitlines() if "speedup" in line and "bound" in line and "keep=" in line]
    assert len(rows) == 2 * len(benchmark.REMOVALS), out  # ratios x removals, each once
    assert len(set(rows)) == len(rows)
    assert out.count("goal ") == len({line for line in out.splitlines() if line.startswith("goal ")})


def test_console_script_points_at_the_cli():
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'vtp-train = "vtp.cli:main"' in text.split("[project.scripts]")[1].split("[")[0]
