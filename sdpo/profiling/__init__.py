"""sdpo.profiling: `sdpo-profile` (overhead suite, kernel benchmarks, Nsight summaries) and the
GPU check. Its shell scripts, pytest-benchmark files and committed results live in the
checkout's top-level `profiling/` folder, which is not a Python package."""

from pathlib import Path

# The checkout this package was loaded from (sdpo/profiling/ -> the repository root): the GPU
# check builds, tests and files its results there.
REPOSITORY = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPOSITORY / "profiling" / "results"
