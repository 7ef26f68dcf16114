"""pytest plugin of the per-op benchmarks, ``bench_<op>.py`` (one file per op stem).

pytest-benchmark times each (case, provider) test; when the whole session passes, each module's
rows go through the harness to benchmarks/results/<op>-<device>.json, with provenance and the
ratios to the module's baselines.

    python -m pytest benchmarks/bench_attention.py [--device cuda] [--allow-dirty] [--round-time S]

A module declares ``SOURCES`` (pathspecs of the code it measures), ``BASELINES`` (providers that
are not blip-fast's, the reference first), ``cases(device)`` (dicts, each with a "case" label
and the fields that go into its rows) and ``providers(device)``; its one test takes ``case``,
``provider`` and ``measure``.
"""

import math
import os
import time

import _harness  # benchmarks/ is on sys.path: pytest inserts a conftest's folder
import pytest
import torch
from _git import REPO, head

# Rounds per test: as many as fit --round-time seconds, within these bounds (5 keeps the median
# meaningful for the slowest reference cases, ~1 s per call on the CPU).
MIN_ROUNDS, MAX_ROUNDS = 5, 1000
_ROWS = pytest.StashKey[dict]()
_COMMIT = pytest.StashKey[str]()


def pytest_addoption(parser):
    group = parser.getgroup("blip-fast benchmarks")
    group.addoption("--device", help="cpu or cuda (default: cuda when torch sees a GPU)")
    group.addoption("--allow-dirty", action="store_true", help=_harness.ALLOW_DIRTY_HELP)
    group.addoption(
        "--round-time",
        type=float,
        default=1.0,
        help=f"seconds of timed rounds per test ({MIN_ROUNDS} to {MAX_ROUNDS} rounds)",
    )


def _device(config) -> str:
    return config.getoption("device") or ("cuda" if torch.cuda.is_available() else "cpu")


def pytest_configure(config):
    config.stash[_ROWS] = {}


def pytest_sessionstart(session):
    message = _harness.dirty_tree_message(session.config.getoption("allow_dirty"))
    if message:
        pytest.exit(message, returncode=2)
    session.config.stash[_COMMIT] = head()


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    device = _device(metafunc.config)
    module = metafunc.module
    params = [(c, p) for c in module.cases(device) for p in module.providers(device)]
    ids = [f"{c['case']}-{p}" for c, p in params]
    metafunc.parametrize(("case", "provider"), params, ids=ids)


@pytest.fixture(scope="session")
def device(request) -> str:
    return _device(request.config)


@pytest.fixture(autouse=True)
def _same_inputs_for_every_provider():
    torch.manual_seed(0)


@pytest.fixture
def measure(benchmark, request, case, provider, device):
    """``measure(fn, flop=None, **fields)``: time ``fn()`` and record the row
    {**case, provider, **fields, median / quartiles in ms, rounds[, GFLOP/s]}."""

    def run(fn, flop=None, **fields):
        if not benchmark.enabled:
            pytest.skip("pytest-benchmark is disabled: nothing to measure")
        if device == "cuda":
            # Kernels run asynchronously: each timed call ends with a synchronize, whose
            # microseconds are small against the milliseconds of these shapes' kernels.
            def timed():
                fn()
                torch.cuda.synchronize()
        else:
            timed = fn
        timed()  # warm-up: first-call allocation, lazy initialisation, compilation
        t0 = time.perf_counter()
        timed()  # a second warm-up call, timed to size the rounds
        once = time.perf_counter() - t0
        round_time = request.config.getoption("round_time")
        rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(round_time / once)))
        benchmark.group = case["case"]
        benchmark.extra_info.update(provider=provider, **fields)
        benchmark.pedantic(timed, rounds=rounds, iterations=1)
        stats = benchmark.stats.stats
        row = {
            **case,
            "provider": provider,
            **fields,
            "median_ms": stats.median * 1e3,
            "q1_ms": stats.q1 * 1e3,
            "q3_ms": stats.q3 * 1e3,
            "rounds": stats.rounds,
        }
        if flop is not None:
            row["gflop_per_s"] = flop / stats.median / 1e9
        request.config.stash[_ROWS].setdefault(request.module, []).append(row)
        return row

    return run


def pytest_sessionfinish(session, exitstatus):
    rows_by_module = session.config.stash[_ROWS]
    if not rows_by_module:
        return
    if exitstatus != 0:
        print("\nbenchmarks failed: no results written")
        return
    device = _device(session.config)
    for module, rows in rows_by_module.items():
        bench_file = os.path.relpath(module.__file__, REPO)
        try:
            path = _harness.write_results(
                module.__name__.removeprefix("bench_"),
                device,
                rows,
                sources=[*module.SOURCES, bench_file, "benchmarks/conftest.py"],
                commit=session.config.stash[_COMMIT],
                allow_dirty=session.config.getoption("allow_dirty"),
                baselines=module.BASELINES,
                command=" ".join(["python -m pytest", *session.config.invocation_params.args]),
            )
        except SystemExit as refused:
            print(f"\n{refused}")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
            return
        print()
        _harness.print_ratios(rows)
        print("wrote", path)
