"""The Triton kernels compile for sm_80 and sm_90 (PTX and cubin), with no GPU present.

The interpreter accepts some programs that the compiler rejects; compiling ahead of time for
the GPU targets (Triton's own ptxas) catches those on a CPU-only machine. Each compile takes
~1 s on 2 cores, so the variants are a covering subset, not the full product.

The compiles carry the specialisation Triton's JIT gives a real launch: every pointer (torch
allocations are 256-byte aligned) and every integer that is a multiple of 16 (the element count
of every latent shape used: 4 x 64 x 64, 16 x 21 x 60 x 104...) is marked divisible by 16. So
the PTX is the one that runs, and the streaming kernels are checked to load 16 bytes at a time.
"""

from __future__ import annotations

import re

import pytest

from sdpo.ops import interpreter_enabled

triton = pytest.importorskip("triton")
if interpreter_enabled():
    # Under TRITON_INTERPRET=1 the kernels are interpreter objects, not compilable; the README's
    # test block runs this file once more without it.
    pytest.skip("ahead-of-time compile runs without TRITON_INTERPRET", allow_module_level=True)
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sdpo.kernels import preference  # noqa: E402

TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
POINTER = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


def compile_kernel(
    kernel, signature: dict, constexprs: dict, target: GPUTarget, aligned: tuple[str, ...] = ()
):
    """Compiles for ``target``; pointers and the integers named in ``aligned`` divisible by 16."""
    constexprs = {name: value for name, value in constexprs.items()}
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    # The JIT's attribute format: {(argument index,): [["tt.divisibility", 16]]}.
    attrs = {
        (index,): [["tt.divisibility", 16]]
        for index, (name, kind) in enumerate(signature.items())
        if kind.startswith("*") or name in aligned
    }
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=target,
    )
    assert compiled.asm["cubin"], "no cubin produced"
    return compiled


def assert_vector_loads(compiled, dtype: str) -> None:
    """16-byte global loads: ld.global.v4.b32 (fp32, or 8 x 16-bit packed in 4 words)."""
    ptx = compiled.asm["ptx"]
    loads = re.findall(r"ld\.global[\w.]*", ptx)
    vector_loads = [load for load in loads if ".v4.b32" in load]
    scalar_loads = [load for load in loads if ".v" not in load]
    assert vector_loads, f"{dtype}: no 16-byte ld.global.v4 in the PTX"
    assert len(vector_loads) > len(scalar_loads), (
        f"{dtype}: {len(vector_loads)} vector vs {len(scalar_loads)} scalar global loads"
    )


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm{t.arch}")
@pytest.mark.parametrize(
    ("dtype", "target_shared", "with_gap"),
    [("bf16", True, False), ("fp16", False, True), ("fp32", True, True)],
)
def test_pair_sums_kernel_compiles(target, dtype, target_shared, with_gap):
    signature = {
        "pred_ptr": POINTER[dtype],
        "ref_ptr": POINTER[dtype],
        "target_ptr": POINTER[dtype],
        "partials_ptr": "*fp32",
        "batch_pairs": "i32",
        "elements": "i64",
        "num_chunks": "i32",
    }
    constexprs = {
        "TARGET_SHARED": target_shared,
        "WITH_GAP": with_gap,
        "BLOCK": preference.SUMS_BLOCK,
        "BLOCKS_PER_CHUNK": 8,
    }
    compiled = compile_kernel(
        preference.pair_sums_kernel, signature, constexprs, target, aligned=("elements",)
    )
    assert_vector_loads(compiled, dtype)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm{t.arch}")
@pytest.mark.parametrize(
    ("method", "safeguard", "batch_lambda", "has_weights"),
    [
        (preference.METHOD_DPO, False, True, False),
        (preference.METHOD_DPO, True, True, True),
        (preference.METHOD_DPO, True, False, False),
        (preference.METHOD_DSPO, True, False, True),
        (preference.METHOD_DSPO_SDXL, True, True, False),
        (preference.METHOD_DMPO, True, False, True),
    ],
)
def test_finalize_kernel_compiles(target, method, safeguard, batch_lambda, has_weights):
    signature = {
        "partials_ptr": "*fp32",
        "weights_ptr": "*fp32",
        "scratch_ptr": "*fp32",
        "loss_ptr": "*fp32",
        "stats_ptr": "*fp32",
        "lambda_ptr": "*fp32",
        "coefficients_ptr": "*fp32",
        "batch_pairs": "i32",
        "num_chunks": "i32",
        "group_size": "i32",
        "pairs_f": "fp32",
        "elements_f": "fp32",
        "beta": "fp32",
        "mu": "fp32",
        "log_q": "fp32",
        "log_one_minus_q": "fp32",
    }
    constexprs = {
        "METHOD": method,
        "SAFEGUARD": safeguard,
        "BATCH_LAMBDA": batch_lambda,
        "HAS_WEIGHTS": has_weights,
        "BLOCK_B": 16,
        "BLOCK_C": 32,
        "GROUP_BLOCK": 8,
    }
    compile_kernel(preference.finalize_kernel, signature, constexprs, target)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm{t.arch}")
@pytest.mark.parametrize(("block_pairs", "block_chunks"), [(1, 512), (2, 256), (1024, 1)])
def test_finalize_kernel_compiles_at_plan_extremes(target, block_pairs, block_chunks):
    # The tiles plan_chunks produces: one pair with 512 chunks, the video size (2 x 256), and
    # 1024 pairs with one chunk each.
    assert (
        preference.next_power_of_2(preference.plan_chunks(block_pairs, 1 << 24)[1]) == block_chunks
    )
    signature = {
        name: "*fp32"
        for name in (
            "partials_ptr", "weights_ptr", "scratch_ptr", "loss_ptr", "stats_ptr", "lambda_ptr",
            "coefficients_ptr",
        )
    }  # fmt: skip
    signature.update({"batch_pairs": "i32", "num_chunks": "i32", "group_size": "i32"})
    signature.update(
        {
            name: "fp32"
            for name in ("pairs_f", "elements_f", "beta", "mu", "log_q", "log_one_minus_q")
        }
    )
    constexprs = {
        "METHOD": preference.METHOD_DSPO,
        "SAFEGUARD": True,
        "BATCH_LAMBDA": False,
        "HAS_WEIGHTS": True,
        "BLOCK_B": block_pairs,
        "BLOCK_C": block_chunks,
        "GROUP_BLOCK": 4,
    }
    compile_kernel(preference.finalize_kernel, signature, constexprs, target)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm{t.arch}")
@pytest.mark.parametrize(("dtype", "with_gap"), [("bf16", False), ("fp16", True), ("fp32", False)])
def test_gradient_kernel_compiles(target, dtype, with_gap):
    signature = {
        "grad_output_ptr": "*fp32",
        "pred_ptr": POINTER[dtype],
        "ref_ptr": POINTER[dtype],
        "target_ptr": POINTER[dtype],
        "coefficients_ptr": "*fp32",
        "grad_ptr": POINTER[dtype],
        "batch_pairs": "i32",
        "elements": "i64",
    }
    constexprs = {"TARGET_SHARED": True, "WITH_GAP": with_gap, "BLOCK": preference.GRADIENT_BLOCK}
    compiled = compile_kernel(
        preference.gradient_kernel, signature, constexprs, target, aligned=("elements",)
    )
    assert_vector_loads(compiled, dtype)
