"""The CUDA kernels compile to PTX for sm_80 and sm_90 and their fast path loads 16 bytes at a
time (ld.global.nc.v4) and stores the gradient the same way (st.global.wb.v4). Needs nvcc
(skipped without it); no GPU.

The CMake build (tests/test_cuda_backend.py) checks that the library builds for both targets;
this file reads the PTX of every kernel instantiation (27 dtype combinations x with/without the
gap term, for the sums and the gradient kernel) and counts the vector accesses one group of 8
elements needs: per input, one 16-byte access for 16-bit values, two for fp32; and checks that
the finalize kernel reduces over the pairs through its shared tile on all its threads.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "kernels" / "cuda" / "sdpo_preference.cu"
ARCHITECTURES = ("80", "90")
ACCESSES = {"float": 2, "__nv_bfloat16": 1, "__half": 1}  # 16-byte accesses per group of 8
KERNEL = re.compile(r"(pair_sums_kernel|gradient_kernel)<([\w ]+), ([\w ]+), ([\w ]+), (\w+)>")


@pytest.fixture(scope="module")
def ptx(tmp_path_factory) -> dict[str, str]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed: the PTX of the .cu cannot be checked here")
    build = tmp_path_factory.mktemp("cuda-ptx")

    def compile_for(arch: str) -> str:
        output = build / f"sdpo_preference_sm{arch}.ptx"
        command = [
            nvcc, "-std=c++17", "-O3", "-ptx", f"-arch=compute_{arch}", "-I", str(SOURCE.parent),
            str(SOURCE), "-o", str(output),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        return output.read_text()

    with ThreadPoolExecutor(len(ARCHITECTURES)) as pool:  # ~30 s each on 2 cores
        return dict(zip(ARCHITECTURES, pool.map(compile_for, ARCHITECTURES), strict=True))


def kernels(ptx_text: str) -> dict[str, str]:
    """Demangled entry name -> its PTX body."""
    parts = re.split(r"\.visible \.entry |\.entry ", ptx_text)[1:]
    names = [part.split("(", 1)[0].strip() for part in parts]
    demangled = subprocess.run(
        ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return dict(zip(demangled, parts, strict=True))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_streaming_kernel_loads_16_bytes_at_a_time(ptx, arch):
    if shutil.which("c++filt") is None:
        pytest.skip("c++filt is not installed")
    found = {"pair_sums_kernel": 0, "gradient_kernel": 0}
    for name, body in kernels(ptx[arch]).items():
        match = KERNEL.search(name)
        if match is None:
            assert "finalize_kernel" in name, name
            continue
        kernel, pred, ref, target, with_gap = match.groups()
        found[kernel] += 1
        loads = len(re.findall(r"ld\.global\.nc\.v4\.(?:u32|b32)", body))
        stores = len(re.findall(r"st\.global(?:\.wb)?\.v4\.(?:u32|b32)", body))
        if kernel == "pair_sums_kernel":
            # winner and loser rows of each input
            assert loads >= 2 * (ACCESSES[pred] + ACCESSES[ref] + ACCESSES[target]), name
            assert stores == 0, name
        else:
            # prediction and target; the winners' reference with the gap term
            expected = ACCESSES[pred] + ACCESSES[target] + (with_gap == "true") * ACCESSES[ref]
            assert loads >= expected, (name, loads)
            assert stores >= ACCESSES[pred], (name, stores)
    # every dtype combination, with and without the gap term
    assert found == {"pair_sums_kernel": 54, "gradient_kernel": 54}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_finalize_reduces_over_pairs_through_its_tile(ptx, arch):
    # The batch totals and the outputs are reduced by all 512 threads in lanes, then a
    # shared-memory tree (sdpo_preference_math.h). Its scratch is the 16 KB tile of the
    # partials: that tile stays the kernel's only shared memory (the one-thread version also
    # kept the totals in shared scalars for the other threads). The block size is a
    # compile-time constant, so the tree is unrolled: lane + width is read at a constant byte
    # offset 4 x width for every width 256, 128, ..., 1 (no such offsets in the one-thread
    # version, whose only tree, over the chunks, has a runtime width).
    if shutil.which("c++filt") is None:
        pytest.skip("c++filt is not installed")
    [body] = [body for name, body in kernels(ptx[arch]).items() if "finalize_kernel" in name]
    shared = re.findall(r"\.shared \.align \d+ \.\w+ ([\w$]+?)(?:\[(\d+)\])?;", body)
    assert [(name.endswith("E4tile"), size) for name, size in shared] == [(True, "16384")]
    offsets = {int(x) for x in re.findall(r"ld\.shared\.f32\s+%f\d+, \[%r\d+\+(\d+)\]", body)}
    assert {4 * (256 >> step) for step in range(9)} <= offsets, sorted(offsets)
