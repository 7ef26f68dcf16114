#!/usr/bin/env bash
# The GPU check, one script, < 10 min on one H100/H200: build the CUDA extension with the
# machine's own torch + triton, run the GPU tests and every op's tests natively, then the op
# benchmarks (results land in benchmarks/results/ and, when set, in $OUT).
# Offline GPU machines install the wheels carried in .whl/ (the DALI ones, see below).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps .whl/*.whl
fi
# First (seconds, no GPU used): every Triton and CUDA kernel configuration compiled for sm_80 /
# sm_90 with its resources checked, from a pure-Python install, before the extension's build.
BLIP_FAST_TARGET_DEVICE=empty python3 -m pip install -q --no-deps --no-build-isolation -e .
python3 benchmarks/compile_check.py
python3 -m pip install -q --no-deps --no-build-isolation -e .
python3 -c "import blip_fast, torch; assert blip_fast.HAS_C and torch.cuda.is_available(); print(torch.cuda.get_device_name(), torch.__version__)"
python3 -m pytest -q -m gpu tests
python3 -m pytest -q tests/ops tests/kernels tests/csrc tests/models/test_med.py
# Benchmarks record the commit and refuse an uncommitted tree: carry .git, with carried wheel
# folders listed in .git/info/exclude, to get results that benchmarks/tables.py accepts; in any
# other copy they run as dry runs (marked dirty, written to the harness's temporary folder). The
# per-op benchmarks need pytest-benchmark (pip download -d .whl pytest-benchmark py-cpuinfo).
# $OUT gets every CUDA result in one archive (at most 8 files come back).
dry=()
results=benchmarks/results
if ! python3 -c 'import sys; sys.path.insert(0, "benchmarks"); import _git; sys.exit(bool(_git.uncommitted()))'; then
    echo "not a clean git checkout: the benchmarks run as dry runs"
    dry=(--allow-dirty)
    results=$(python3 -c 'import sys; sys.path.insert(0, "benchmarks"); import _harness; print(_harness.DRY_RUN_DIR)')
fi
python3 -m pytest -q -p no:cacheprovider --device cuda "${dry[@]}" benchmarks/bench_attention.py \
    benchmarks/bench_cross_attention.py benchmarks/bench_gathered_cross_attention.py \
    benchmarks/bench_itc.py benchmarks/bench_optimizer.py
python3 benchmarks/bench_train_step.py --device cuda --no-lever-rows --steps 10 "${dry[@]}"
python3 benchmarks/bench_retrieval_eval.py --device cuda "${dry[@]}"
python3 benchmarks/bench_demo.py "${dry[@]}"
# DALI GPU decode (bench_data.py's dali-gpu row; target >= 3000 img/s at 384 px on one H100) and
# the DALI tests need nvidia-dali-cuda130: carry its wheels in .whl/ too (pip download -d .whl
# nvidia-dali-cuda130 simplejpeg scikit-image) or install them; without DALI both skip.
python3 benchmarks/bench_data.py --images 4096 --epochs 3 --batch-size 256 "${dry[@]}"
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/results-cuda.tar.gz" -C "$results" $(cd "$results" && echo ./*-cuda.json)
fi
