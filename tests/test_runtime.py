"""configure_cpu_threads: which count wins, what it logs, and the errors for bad input."""

from __future__ import annotations

import pytest
import torch

from sdpo.train.runtime import DEFAULT_CPU_THREADS, configure_cpu_threads


@pytest.fixture(autouse=True)
def restore_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def test_a_request_wins_over_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert configure_cpu_threads(2, program="demo") == 2
    assert torch.get_num_threads() == 2
    assert capsys.readouterr().err == "demo: CPU threads: 2 (requested)\n"


def test_the_environment_wins_over_the_default(monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", " 2 ")
    assert configure_cpu_threads(None, default=1) == 2
    assert torch.get_num_threads() == 2
    assert "CPU threads: 2 (from OMP_NUM_THREADS)" in capsys.readouterr().err


def test_without_either_the_default_is_one_thread(monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert DEFAULT_CPU_THREADS == 1
    assert configure_cpu_threads(None) == 1
    assert torch.get_num_threads() == 1
    logged = capsys.readouterr().err.splitlines()
    assert len(logged) == 1 and "torch would use 2" in logged[0], logged


def test_silent_when_asked(monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    configure_cpu_threads(1, log=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_environment_value_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(ValueError, match="OMP_NUM_THREADS: expected a whole number >= 1"):
        configure_cpu_threads(None)


@pytest.mark.parametrize("value", [0, -3, True, 1.0])
def test_a_bad_request_is_a_clear_error(value):
    with pytest.raises(ValueError, match="threads: expected a whole number >= 1"):
        configure_cpu_threads(value)


def test_sdpo_train_picks_one_thread_for_the_tiny_model_and_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    from sdpo.train import cli

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.set_num_threads(2)
    try:
        status = cli.main(
            ["--preset", "tiny", "--max-steps", "1", "--output-dir", str(tmp_path / "run")]
        )
        threads_during_run = torch.get_num_threads()
    finally:
        torch.set_num_threads(1)
    assert status == 0
    assert threads_during_run == 1
    assert "CPU threads 1 per process" in capsys.readouterr().err  # the start banner says so


def test_sdpo_train_rejects_a_bad_omp_num_threads_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    from sdpo.train import cli

    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status = cli.main(["--preset", "tiny", "--max-steps", "1", "--output-dir", str(tmp_path)])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert error == ["sdpo-train: error: OMP_NUM_THREADS: expected a whole number >= 1, got 'two'"]
