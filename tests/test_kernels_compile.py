"""The Triton kernels compile for sm_80 and sm_90 (PTX and cubin), with no GPU present.

The interpreter accepts some programs that the compiler rejects; compiling ahead of time for
the GPU targets (Triton's own ptxas) catches those on a CPU-only machine. Each compile takes
~1 s on 2 cores, so the variants are a covering subset, not the full product.
"""

from __future__ import annotations

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


def compile_kernel(kernel, signature: dict, constexprs: dict, target: GPUTarget):
    constexprs = {name: value for name, value in constexprs.items()}
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target
    )
    assert compiled.asm["cubin"], "no cubin produced"
    return compiled


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
        "chunk_elements": "i32",
        "num_chunks": "i32",
    }
    constexprs = {
        "TARGET_SHARED": target_shared,
        "WITH_GAP": with_gap,
        "BLOCK": preference.SUMS_BLOCK,
    }
    compile_kernel(preference.pair_sums_kernel, signature, constexprs, target)


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
        "BLOCK_C": 64,
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
    compile_kernel(preference.gradient_kernel, signature, constexprs, target)
