"""tools/torch_api_check.py: the static check that every torch API the project names exists in
the installed torch (what tests/torch_floor.sh runs under the GPU image's older torch)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import torch_api_check  # noqa: E402


def project_problems() -> list[str]:
    return torch_api_check.check(ROOT / name for name in torch_api_check.DEFAULT_PATHS)


def source_problems(source: str) -> list[str]:
    return torch_api_check.check_source(source, "probe.py", torch_api_check.Resolver())


def test_the_project_uses_only_apis_of_the_installed_torch():
    assert project_problems() == []


def test_an_api_missing_from_torch_is_found_where_the_gpu_only_path_calls_it(monkeypatch):
    # cudagraph_mark_step_begin runs only under --cuda-graphs (a GPU): no CPU test calls it.
    monkeypatch.delattr(torch.compiler, "cudagraph_mark_step_begin")
    problems = project_problems()
    trainer = [problem for problem in problems if problem.startswith("sdpo/train/trainer.py:")]
    assert trainer and all("cudagraph_mark_step_begin" in problem for problem in trainer)
    assert "torch.compiler has no attribute 'cudagraph_mark_step_begin'" in trainer[0]


def test_a_keyword_the_installed_torch_does_not_take_is_found(monkeypatch):
    # As an older torch.compile without `mode` would be: sdpo/train/models.py passes mode=.
    real = torch.compile

    def compile_without_mode(model=None, *, fullgraph=False, dynamic=None, backend="inductor"):
        return real(model, fullgraph=fullgraph, dynamic=dynamic, backend=backend)

    monkeypatch.setattr(torch, "compile", compile_without_mode)
    problems = project_problems()
    assert any(
        problem.startswith("sdpo/train/models.py:")
        and "torch.compile() takes no keyword argument 'mode'" in problem
        for problem in problems
    ), problems
    assert "fork_rng() takes no keyword argument 'bogus'" in "\n".join(
        source_problems("import torch\ntorch.random.fork_rng(devices=[], bogus=1)\n")
    )
    assert source_problems("import torch\ntorch.random.fork_rng(devices=[])\n") == []
    # A signature with **kwargs takes any name: nothing to report.
    monkeypatch.setattr(torch.compiler, "takes_any", lambda **options: None, raising=False)
    assert source_problems("import torch\ntorch.compiler.takes_any(anything=True)\n") == []


def test_names_reached_through_aliases_and_from_imports_are_checked():
    source = "\n".join(
        [
            "import torch.distributed as dist",
            "from torch.nn.attention import SDPBackend, not_a_function",
            "from torch import nn",
            "def f():",
            "    dist.ReduceOp.SUM",
            "    dist.not_a_collective",
            "    SDPBackend.CUDNN_ATTENTION",
            "    SDPBackend.NOT_A_BACKEND",
            "    nn.Linear(2, 2, bias=False, not_an_option=1)",
            "    torch_like = object()",  # not torch: never looked up
            "    torch_like.anything",
        ]
    )
    problems = source_problems(source)
    assert problems == [
        "probe.py:2: torch.nn.attention.not_a_function: torch.nn.attention has no attribute "
        "'not_a_function'",
        "probe.py:6: torch.distributed.not_a_collective: torch.distributed has no attribute "
        "'not_a_collective'",
        "probe.py:8: torch.nn.attention.SDPBackend.NOT_A_BACKEND: "
        "torch.nn.attention.SDPBackend has no attribute 'NOT_A_BACKEND'",
        "probe.py:9: torch.nn.Linear() takes no keyword argument 'not_an_option'",
    ]


def test_a_missing_instance_method_is_found(monkeypatch):
    # PersistentGradients (sdpo/train/step.py) hooks each weight; no static chain reaches it.
    monkeypatch.delattr(torch.Tensor, "register_post_accumulate_grad_hook")
    assert torch_api_check.check_instance_methods(torch_api_check.Resolver()) == [
        "INSTANCE_METHODS: torch.Tensor has no method 'register_post_accumulate_grad_hook'"
    ]


@pytest.mark.parametrize("tensorboard", [None, types.ModuleType("tensorboard")])
def test_a_torch_module_needing_an_absent_package_is_not_a_problem(monkeypatch, tensorboard):
    # torch.utils.tensorboard exists in every torch, but imports only with tensorboard installed
    # (the GPU image may lack it; the trainer then logs to metrics.jsonl only). None: not
    # installed (ModuleNotFoundError); a module without __version__: too old (ImportError).
    monkeypatch.setitem(sys.modules, "tensorboard", tensorboard)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    monkeypatch.delattr(torch.utils, "tensorboard", raising=False)
    assert source_problems("from torch.utils.tensorboard import SummaryWriter\n") == []


def test_command_line_exit_status(capsys, tmp_path):
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("import torch\ntorch.compiler.is_compiling()\n")
    bad.write_text("import torch\ntorch.compiler.is_compiling_now()\n")
    assert torch_api_check.main([str(good)]) == 0
    assert torch_api_check.main([str(bad)]) == 1
    output = capsys.readouterr().out
    assert "bad.py:2: torch.compiler.is_compiling_now" in output
    assert f"torch {torch.__version__}: 1 problem(s)" in output
