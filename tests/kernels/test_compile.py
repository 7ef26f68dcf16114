"""The ahead-of-time compile check (benchmarks/compile_check.py) and the launch configurations it
enumerates. Tracing the launchers needs no compiler and runs here; compiling needs Triton's JIT,
which TRITON_INTERPRET (tests/conftest.py sets it without CUDA) replaces, so those tests run
the check in a subprocess without it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from blip_fast.kernels import cross_attention, gathered_cross_attention, itc, lm_head_loss
from blip_fast.kernels._utils import SM80, SM90, GpuLimits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)
import compile_check  # noqa: E402

SM89 = GpuLimits(89, 99 * 1024)  # A10 / L4 / RTX 4090: less shared memory than both targets


def compiler_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (BENCHMARKS, env.get("PYTHONPATH"))))
    return env


def kernels_defined():
    """Every @triton.jit kernel of kernels/, by function name (aliases count once)."""
    modules = (cross_attention, gathered_cross_attention, itc, lm_head_loss)
    return {
        obj.__name__
        for module in modules
        for name, obj in vars(module).items()
        if name.endswith("_kernel") and hasattr(obj, "fn")
    }


def flags(launches, kernel, names):
    return {
        tuple(launch.config[n] for n in names)
        for launch in launches
        if launch.kernel.__name__ == kernel
    }


def test_enumeration_covers_every_kernel_and_flag():
    launches = compile_check.traced_launches(SM90, dtypes=(torch.bfloat16,))
    assert {launch.kernel.__name__ for launch in launches} == kernels_defined()
    fwd, bwd = "_cross_attention_fwd_kernel", "_cross_attention_bwd_kernel"
    # cross (mask or not), self (causal, mask or not), gathered (index, no mask)
    assert flags(launches, fwd, ("HAS_MASK", "HAS_IDX", "CAUSAL")) == {
        (False, False, False),
        (True, False, False),
        (False, False, True),
        (True, False, True),
        (False, True, False),
    }
    assert flags(launches, bwd, ("HAS_MASK", "HAS_IDX", "CAUSAL")) == {
        (m, False, c) for m in (False, True) for c in (False, True)
    } | {(False, True, False)}
    for kernel in (fwd, bwd):
        assert flags(launches, kernel, ("BLOCK_M",)) == {(16,), (32,), (64,)}
        assert flags(launches, kernel, ("BLOCK_D",)) == {(64,), (128,)}
    for kernel in ("_itc_fwd_kernel", "_itc_bwd_kernel"):
        assert flags(launches, kernel, ("HAS_IDX", "TEACHER")) == {
            (i, t) for i in (False, True) for t in (False, True)
        }
    assert flags(launches, "_lm_head_loss_kernel", ("HAS_GRAD", "BLOCK_V")) == {
        (g, 8192) for g in (False, True)
    }


@pytest.mark.parametrize("limits", (SM80, SM90, SM89), ids=lambda x: f"sm_{x.arch}")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_every_configuration_has_a_pipeline(limits, dtype):
    """Smaller shared memory costs pipeline stages (or key tiles), never a launch."""
    for backward in (False, True):
        for head_dim in (40, 64, 128):
            for q_len in (1, 17, 35, 77):
                config = cross_attention.attention_config(
                    q_len, head_dim, dtype, limits, backward=backward
                )
                assert config["num_stages"] >= 1
        assert itc.itc_config(256, dtype, limits, backward=backward)["num_stages"] >= 1


def test_no_fitting_configuration_names_the_limit():
    tiny = GpuLimits(75, 16 * 1024)
    with pytest.raises(ValueError, match="fits 16384 bytes of shared memory"):
        cross_attention.attention_config(35, 128, torch.float32, tiny, backward=True)
    with pytest.raises(ValueError, match="fits 16384 bytes of shared memory"):
        itc.itc_config(256, torch.float32, tiny, backward=False)


def test_parse_ptxas():
    log = textwrap.dedent("""\
        ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_80'
        ptxas info    : Function properties for _Z6kernelPf
            16 bytes stack frame, 24 bytes spill stores, 28 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 1792 bytes smem, 512 bytes cmem[0]
        ptxas info    : Compiling entry function '_Z6otherPf' for 'sm_90a'
        ptxas info    : Used 40 registers, used 1 barriers
        """)
    assert compile_check.parse_ptxas(log) == [
        dict(
            function="_Z6kernelPf",
            arch="sm_80",
            regs=255,
            spill_stores=24,
            spill_loads=28,
            static_smem=1792,
        ),
        dict(
            function="_Z6otherPf",
            arch="sm_90a",
            regs=40,
            spill_stores=0,
            spill_loads=0,
            static_smem=0,
        ),
    ]


def test_check_compiles_a_kernel_family(tmp_path):
    """The check itself, on one kernel in one dtype: every flag combination for both targets."""
    cmd = [sys.executable, os.path.join(BENCHMARKS, "compile_check.py"), "--no-cuda"]
    cmd += ["--kernels", "_itc_fwd_kernel", "--dtypes", "bfloat16", "--out", str(tmp_path)]
    subprocess.run(cmd, env=compiler_env(), check=True, capture_output=True, timeout=600)
    rows = json.loads((tmp_path / "triton.json").read_text())
    configs = [dict(kv.split("=") for kv in row["config"].split()) for row in rows]
    assert {(r["arch"], c["HAS_IDX"], c["TEACHER"]) for r, c in zip(rows, configs)} == {
        (arch, i, t) for arch in ("sm_80", "sm_90") for i in "01" for t in "01"
    }
    for row in rows:
        assert row["error"] == "" and 0 < row["smem"] <= row["smem_limit"] and row["regs"] > 0


# Kernels with the faults the check exists for: a module global read without tl.constexpr, and
# tiles whose shared memory exceeds sm_90's 227 KiB per block.
FAULTY_KERNELS = """
import json, torch, triton, triton.language as tl
from compile_check import compile_launch
from blip_fast.kernels._utils import SM90, KernelLaunch

SCALE = 2.0

@triton.jit
def global_kernel(X):
    tl.store(X, tl.load(X) * SCALE)

@triton.jit
def big_tile_kernel(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A + rm[:, None] * K + rk[None, :])
    b = tl.load(B + rk[:, None] * N + rn[None, :])
    tl.store(C + rm[:, None] * N + rn[None, :], tl.dot(a, b))

x = torch.empty(1, device="meta")
a, b, c = (torch.empty(128 * 512, device="meta", dtype=torch.float16) for _ in "abc")
launches = (
    KernelLaunch(global_kernel, (x,), {}),
    KernelLaunch(big_tile_kernel, (a, b, c), dict(M=128, N=128, K=512, num_warps=8)),
)
print(json.dumps([compile_launch(launch, SM90) for launch in launches]))
"""


def test_check_reports_the_faults_it_exists_for(tmp_path):
    script = tmp_path / "faulty_kernels.py"
    script.write_text(FAULTY_KERNELS)
    proc = subprocess.run(
        [sys.executable, str(script)],
        env=compiler_env(),
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    global_row, big_tile_row = json.loads(proc.stdout.splitlines()[-1])
    assert "SCALE" in global_row["error"]
    assert big_tile_row["error"].startswith("shared memory")
    assert big_tile_row["smem"] > SM90.max_shared_mem
