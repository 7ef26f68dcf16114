"""Build blip-fast: the Python packages plus the ``blip_fast._C`` kernel extension.

Install (after ``pip install torch``; the extension compiles against the installed torch):
    pip install --no-build-isolation -e ".[test]"

``BLIP_FAST_TARGET_DEVICE`` chooses what gets compiled:
    cpu    csrc/cpu kernels only (OpenMP)
    cuda   csrc/cpu + csrc/cuda kernels (needs a CUDA build of torch and CUDA_HOME)
    empty  no extension: a pure-Python install, every op runs its reference kernel
Unset, it is ``cuda`` when torch was built with CUDA and a toolkit is found, else ``cpu``; the
choice never depends on which GPU (if any) is in the build machine.
``MAX_JOBS`` caps parallel compile jobs (default: what available memory allows).
"""

import glob
import os
import re

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
TARGETS = ("cpu", "cuda", "empty")
# kernels/ and train/ ship inside the package, so an install never puts generic top-level
# modules named `kernels` or `train` on sys.path.
PACKAGE_DIR = {"blip_fast.kernels": "kernels", "blip_fast.train": "train"}
# Peak resident memory of one g++ / nvcc job compiling a torch extension source, roughly.
GIB_PER_COMPILE_JOB = 3


def read_version() -> str:
    with open(os.path.join(ROOT, "blip_fast", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    if match is None:
        raise RuntimeError('blip_fast/__init__.py: no __version__ = "..." line')
    return match.group(1)


def target_device() -> str:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    target = os.environ.get("BLIP_FAST_TARGET_DEVICE", "").strip().lower()
    if target and target not in TARGETS:
        raise ValueError(f"BLIP_FAST_TARGET_DEVICE={target!r}: expected one of {TARGETS}")
    if target == "cuda" and (torch.version.cuda is None or CUDA_HOME is None):
        raise RuntimeError(
            f"BLIP_FAST_TARGET_DEVICE=cuda needs a CUDA build of torch and a CUDA "
            f"toolkit; torch {torch.__version__} has CUDA {torch.version.cuda}, "
            f"CUDA_HOME={CUDA_HOME}"
        )
    if target:
        return target
    return "cuda" if torch.version.cuda is not None and CUDA_HOME is not None else "cpu"


def default_max_jobs() -> int:
    """Compile jobs that fit in available memory (FlashAttention's rule), at most one per core."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        by_memory = kib // (GIB_PER_COMPILE_JOB * 1024 * 1024)
    except (OSError, StopIteration):
        by_memory = os.cpu_count() or 1
    return max(1, min(os.cpu_count() or 1, by_memory))


def packages() -> list[str]:
    found = find_packages(ROOT, include=["blip_fast", "blip_fast.*"])
    for name, path in PACKAGE_DIR.items():
        found += [name] + [f"{name}.{sub}" for sub in find_packages(os.path.join(ROOT, path))]
    return found


def sources(pattern: str) -> list[str]:
    """Sources relative to setup.py, as setuptools requires, in a stable order."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions(target: str) -> tuple[list, dict]:
    if target == "empty":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    # -Wno-psabi: GCC warns that 64-byte vectors passed by value change the ABI between ISA
    # levels; csrc/cpu/vec.h only passes them between always-inline helpers.
    cxx = ["-O3", "-fopenmp", "-Wno-psabi"]
    srcs = (
        sources("csrc/torch_bindings.cpp") + sources("csrc/ops/*.cpp") + sources("csrc/cpu/*.cpp")
    )
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if target == "cuda":
        ext = CUDAExtension(
            "blip_fast._C",
            srcs + sources("csrc/cuda/*.cu"),
            extra_compile_args={
                "cxx": cxx + ["-DBLIP_FAST_WITH_CUDA"],
                "nvcc": ["-O3", "-DBLIP_FAST_WITH_CUDA"],
            },
            **kwargs,
        )
    else:
        ext = CppExtension("blip_fast._C", srcs, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions(target_device())

setup(
    name="blip-fast",
    version=read_version(),
    description="Fast, drop-in reimplementation of BLIP (Li et al., ICML 2022)",
    python_requires=">=3.10",
    package_dir=PACKAGE_DIR,
    packages=packages(),
    # vocab/: the bert-base-uncased vocab the tokenizer reads, with its LICENSE and NOTICE
    # search/page.html: the page blip-fast serve answers at /
    package_data={"blip_fast": ["configs/*.json", "vocab/*", "search/*.html"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "tokenizers",
        "safetensors",
    ],
    extras_require={
        # triton: CI runs every Triton kernel on the CPU under TRITON_INTERPRET=1.
        # nvidia-dali-cuda130 (~0.5 GB, ~10 s to install): CI runs the DALI graph on its CPU
        # operators; scikit-image: real photos for the loader tests; simplejpeg: fast decode.
        "test": [
            "pytest",
            "ruff==0.17.6",  # formatting changes between ruff releases: CI checks with this one
            "pytest-benchmark",
            # 5.25 imports the `kernels` distribution (its hub kernels), a top-level name this
            # project's own `kernels` package shadows: HF parity tests fail to import
            "transformers<5.25",
            "matplotlib",
            "triton>=3.7,<3.8",
            "nvidia-dali-cuda130",
            "scikit-image",
            "simplejpeg",
            # caption scoring (needs java) and approximate search, so their tests run in CI
            "pycocoevalcap",
            "faiss-cpu",
            # blip-fast serve's API and page tests (chromium itself is a system package)
            "fastapi",
            "uvicorn",
            "python-multipart",
            "httpx",
            "playwright",
            "av>=18",  # PyAV: video clips for text-to-video retrieval
        ],
        "triton": ["triton>=3.7,<3.8"],
        "dali": ["nvidia-dali-cuda130", "simplejpeg"],
        "jpeg": ["simplejpeg"],  # libjpeg-turbo decode, bit-identical to PIL, ~1.3-2.5x faster
        "bench": ["matplotlib"],
        # caption metrics (blip-fast eval-caption); its tokenizer and METEOR also need java
        "caption": ["pycocoevalcap"],
        # approximate search (blip-fast search --approximate)
        "ann": ["faiss-cpu"],
        "serve": ["fastapi", "uvicorn", "python-multipart"],  # blip-fast serve
        "video": ["av>=18"],  # PyAV: decoding clips (blip-fast eval-video)
    },
    entry_points={"console_scripts": ["blip-fast = blip_fast.cli:main"]},
)
