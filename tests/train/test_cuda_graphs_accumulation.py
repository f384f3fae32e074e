"""CUDA graphs with gradient accumulation: the gradients live in buffers outside the graph pool
(``step.PersistentGradients``), so a replay cannot overwrite what earlier micro-batches summed.

On the CPU the graph pool is emulated: a backward whose gradient is handed to autograd as a
fresh alias of one reused buffer, as a CUDA-graph replay hands over its static outputs. That
reproduces the failure (autograd installs the alias as ``.grad``, the next "replay" overwrites
it) and shows the persistent buffers fix it; the trainer's persistent-gradient path is then
compared bit for bit with its ordinary one. The GPU test runs the real thing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from trainer_helpers import read_rows, tiny

from sdpo.train import trainer as trainer_module
from sdpo.train.config import config_from_args
from sdpo.train.errors import UsageError
from sdpo.train.step import PersistentGradients, apply_optimizer_step
from sdpo.train.trainer import train


class PoolMatmul(torch.autograd.Function):
    """``x @ weight.T`` whose weight gradient comes back in ``pool``'s memory, as an alias made
    fresh for each backward (what a CUDA-graph replay returns: new tensors over static storage)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.pool = pool
        return x @ weight.T

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        pool = ctx.pool
        pool.copy_(grad_out.T @ x)  # the replay writes its output into the pool
        alias = torch.empty(0, dtype=pool.dtype).set_(
            pool.untyped_storage(), pool.storage_offset(), pool.shape, pool.stride()
        )
        return grad_out @ weight, alias, None


class PoolModel(nn.Module):
    """One pool-backed weight, one ordinary weight, and one weight no input ever reaches."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.pooled = nn.Parameter(torch.randn(3, 4, generator=generator))
        self.plain = nn.Parameter(torch.randn(2, 3, generator=generator))
        self.unused = nn.Parameter(torch.randn(5, generator=generator))
        self.pool = torch.zeros(3, 4)

    def forward(self, x: torch.Tensor, use_pool: bool) -> torch.Tensor:
        hidden = PoolMatmul.apply(x, self.pooled, self.pool) if use_pool else x @ self.pooled.T
        return (hidden.tanh() @ self.plain.T).square().sum()


def micro_batches(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(6, 4, generator=generator) for _ in range(4)]


def train_pool_model(use_pool: bool, persistent: bool, steps: int = 3) -> dict[str, torch.Tensor]:
    """AdamW with weight decay over ``steps`` optimizer steps of 4 accumulated micro-batches."""
    model = PoolModel()
    parameters = list(model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=0.05, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    buffers = PersistentGradients(parameters) if persistent else None
    for step in range(steps):
        for x in micro_batches(step):
            (model(x, use_pool) / 4).backward()
        if buffers is not None:
            buffers.release_unused()
        apply_optimizer_step(optimizer, schedule, None, buffers)
    return {name: tensor.detach().clone() for name, tensor in model.named_parameters()}


def test_the_emulated_pool_corrupts_accumulation_without_persistent_buffers():
    # The emulation must show the failure it stands for, or the next test proves nothing.
    eager = train_pool_model(use_pool=False, persistent=False)
    corrupted = train_pool_model(use_pool=True, persistent=False)
    assert not torch.allclose(corrupted["pooled"], eager["pooled"], rtol=1e-3, atol=1e-3)


def test_persistent_buffers_make_pooled_accumulation_exact():
    eager = train_pool_model(use_pool=False, persistent=False)
    for use_pool in (False, True):
        persistent = train_pool_model(use_pool=use_pool, persistent=True)
        for name in eager:
            # The pool path's own backward is the same maths as autograd's matmul backward.
            torch.testing.assert_close(persistent[name], eager[name], rtol=0, atol=0)


def test_a_parameter_without_gradient_is_left_alone_as_in_eager():
    # Eager: .grad stays None, AdamW skips it (no weight decay, no moments). A zero buffer kept
    # for it would decay it by lr x weight_decay = 0.5% per step.
    initial = PoolModel().unused.detach().clone()
    persistent = train_pool_model(use_pool=True, persistent=True)
    assert torch.equal(persistent["unused"], initial)


def test_the_buffers_are_zeroed_in_place_never_replaced():
    model = PoolModel()
    parameters = list(model.parameters())
    buffers = PersistentGradients(parameters)
    addresses = [p.grad.data_ptr() for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    for step in range(2):
        for x in micro_batches(step):
            model(x, use_pool=True).backward()
        buffers.release_unused()
        apply_optimizer_step(optimizer, schedule, None, buffers)
        assert [p.grad.data_ptr() for p in parameters[:2]] == addresses[:2]
        assert all(bool((p.grad == 0).all()) for p in parameters[:2])
        assert model.unused.grad is None


def test_a_freed_buffer_is_an_error_not_a_silent_fallback():
    model = PoolModel()
    buffers = PersistentGradients(list(model.parameters()))
    model(micro_batches(0)[0], use_pool=False).backward()
    buffers.release_unused()
    model.pooled.grad = None  # e.g. someone's zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="set_to_none=False"):
        buffers.zero()


def final_weights(output_dir: str | Path) -> dict[str, torch.Tensor]:
    folder = Path(output_dir)
    files = sorted(folder.rglob("*.safetensors"))
    assert files, f"no exported weights under {folder}"
    return {
        f"{path.relative_to(folder)}:{k}": v for path in files for k, v in load_file(path).items()
    }


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"mixed_precision": "fp16"},  # the GradScaler unscales the persistent buffers in place
        {"lora_rank": 4},
    ],
    ids=["full", "fp16-scaler", "lora"],
)
def test_the_trainer_with_persistent_gradients_equals_its_eager_path(
    tmp_path, monkeypatch, overrides
):
    common = {"gradient_accumulation": 3, "max_steps": 3, "log_every": 1, **overrides}
    baseline = tiny(tmp_path, "eager", **common)
    train(baseline)
    created: list[PersistentGradients] = []

    class Recorded(PersistentGradients):
        def __init__(self, parameters):
            super().__init__(parameters)
            created.append(self)

    monkeypatch.setattr(trainer_module, "uses_persistent_gradients", lambda config: True)
    monkeypatch.setattr(trainer_module, "PersistentGradients", Recorded)
    run = tiny(tmp_path, "persistent", **common)
    train(run)
    assert len(created) == 1 and created[0].parameters, "the persistent path did not run"

    def untimed(output_dir):
        return [
            {k: v for k, v in row.items() if k != "pairs_per_s"} for row in read_rows(output_dir)
        ]

    assert untimed(run.output_dir) == untimed(baseline.output_dir)
    expected, got = final_weights(baseline.output_dir), final_weights(run.output_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_persistent_gradients_through_skipped_fp16_steps_and_a_resume(tmp_path, monkeypatch):
    # A loss scale near fp32's limit makes some steps overflow (skipped on the device, the
    # buffers zeroed all the same); a run resumed halfway must still equal the ordinary run.
    from test_resume_state import INITIAL_SCALE, comparable, near_overflow_scaler, training_state

    monkeypatch.setattr(trainer_module, "make_grad_scaler", near_overflow_scaler)
    settings = dict(max_steps=4, log_every=1, mixed_precision="fp16", synthetic_pairs=8)
    ordinary = tiny(tmp_path, "ordinary", checkpoint_every=2, **settings)
    train(ordinary)
    monkeypatch.setattr(trainer_module, "uses_persistent_gradients", lambda config: True)
    persistent = tiny(tmp_path, "persistent", checkpoint_every=2, **settings)
    train(persistent)
    resumed = tiny(
        tmp_path, "resumed", resume=str(Path(persistent.output_dir) / "checkpoint-2"), **settings
    )
    train(resumed)
    rows = comparable(read_rows(ordinary.output_dir))
    scale = training_state(Path(ordinary.output_dir) / "checkpoint-2")["grad_scaler"]["scale"]
    assert scale < INITIAL_SCALE, "no step overflowed: the test lost its point"
    assert comparable(read_rows(persistent.output_dir)) == rows
    assert comparable(read_rows(resumed.output_dir)) == [row for row in rows if row["step"] > 2]
    expected = torch.load(Path(ordinary.output_dir) / "unet.pth")
    for run in (persistent, resumed):
        got = torch.load(Path(run.output_dir) / "unet.pth")
        assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_cuda_graphs_with_accumulation_is_accepted_and_with_fsdp_refused(monkeypatch):
    # The machine check refuses --cuda-graphs without a GPU: pretend there is one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = config_from_args(["--preset", "tiny", "--cuda-graphs", "--gradient-accumulation", "4"])
    assert config.cuda_graphs and config.gradient_accumulation == 4
    config.fsdp = True
    with pytest.raises(UsageError, match=r"cuda_graphs: with --fsdp.*--gradient-accumulation 1"):
        config.validate()


@pytest.mark.gpu
@pytest.mark.slow  # four tiny trainings, three compiled: minutes
def test_cuda_graphs_with_accumulation_match_compile_on_a_gpu(tmp_path):
    """The real graphs: 3 optimizer steps of 4 accumulated micro-batches under --cuda-graphs
    against --compile (the same Inductor kernels, no graphs) and eager. The failure this guards
    against drops or doubles micro-batches, an error of the size of the gradient itself."""
    common = {
        "gradient_accumulation": 4,
        "max_steps": 3,
        "log_every": 1,
        "mixed_precision": "no",
        "learning_rate": 1e-3,
    }
    runs = {}
    for name, flags in {
        "eager": {},
        "compile": {"compile": True},
        "graphs": {"cuda_graphs": True},
    }.items():
        config = tiny(tmp_path, name, **common, **flags)
        train(config)
        runs[name] = (final_weights(config.output_dir), read_rows(config.output_dir))
    initial = tiny(tmp_path, "initial", **{**common, "max_steps": 1, "learning_rate": 0.0})
    train(initial)
    start = final_weights(initial.output_dir)
    for name in runs["eager"][0]:
        moved = float((runs["eager"][0][name] - start[name]).abs().max())
        graphs, compiled = runs["graphs"][0][name], runs["compile"][0][name]
        # Same kernels with and without graphs: far closer than 1% of what 3 steps moved.
        assert float((graphs - compiled).abs().max()) <= 0.01 * moved + 1e-7, name
        # Against eager: compiled kernels round differently, but far less than a step.
        assert float((graphs - runs["eager"][0][name]).abs().max()) <= 0.05 * moved + 1e-6, name
    graphs_losses = [row["loss"] for row in runs["graphs"][1]]
    compiled_losses = [row["loss"] for row in runs["compile"][1]]
    assert len(graphs_losses) == 3
    torch.testing.assert_close(graphs_losses, compiled_losses, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("accumulation", "said"), [(4, True), (1, False)])
def test_the_banner_says_where_accumulated_gradients_live(accumulation, said):
    from sdpo.train.runlog import banner_lines

    config = config_from_args(["--preset", "tiny", "--gradient-accumulation", str(accumulation)])
    config.cuda_graphs = True
    lines = banner_lines(
        config,
        data_pairs=16,
        world_size=1,
        device=torch.device("cuda"),
        resumed_from=None,
        epochs_note="",
    )
    text = "\n".join(lines)
    assert "compiled: torch.compile + CUDA graphs" in text
    assert ("accumulated gradients in buffers outside the graph pool" in text) is said


@pytest.mark.slow  # two 2-process torchrun trainings: ~1 min on 2 cores
def test_persistent_gradients_under_ddp_equal_the_ordinary_ddp_run(tmp_path):
    # DDP all-reduces on the last micro-batch and copies the result back into each .grad: with
    # persistent buffers that copy lands in place. Same seed, same processes: bit for bit.
    import os
    import subprocess
    import sys

    environment = {key: value for key, value in os.environ.items() if not key.startswith("TRITON")}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    flags = ["--preset", "tiny", "--max-steps", "2", "--gradient-accumulation", "3"]
    flags += ["--no-progress", "--log-every", "1"]
    outputs = {}
    for name, entry in {
        "ordinary": ["-m", "sdpo.train"],
        "persistent": [str(Path(__file__).parent / "persistent_gradients_main.py")],
    }.items():
        output = tmp_path / name
        command = [*launcher, *entry, *flags, "--output-dir", str(output)]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = output
    untimed = [
        [{k: v for k, v in row.items() if k != "pairs_per_s"} for row in read_rows(output)]
        for output in outputs.values()
    ]
    assert len(untimed[0]) == 2 and untimed[0] == untimed[1]
    expected = torch.load(outputs["ordinary"] / "unet.pth")
    got = torch.load(outputs["persistent"] / "unet.pth")
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)
