"""train.heap.keep_freed_memory: a block freed and allocated again is not faulted in again
(it is with glibc's default policy); build_trainer applies it on the CPU unless the lever is
off; another C library is left alone, with a log line."""

import logging
import platform
import subprocess
import sys
import textwrap

import pytest

from blip_fast.train import heap, main
from blip_fast.train.main import StepLevers, build_trainer

PAGES = (64 << 20) // 4096  # one 64 MiB block
# Minor page faults of allocating and filling the block, freed each time; after a few rounds
# (the heap settles around the interpreter's own blocks) the largest of the rest is printed.
_FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    from blip_fast.train.heap import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(16 << 20).fill_(1.0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del x
    print(max(faults[4:]))
    """
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc policy")
@pytest.mark.parametrize("policy", ["default", "keep"])
def test_a_block_freed_and_allocated_again_faults_in_only_under_the_default_policy(policy):
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, policy], capture_output=True, text=True, check=True
    )
    faults = int(out.stdout.split()[-1])
    if policy == "keep":
        assert faults < PAGES // 100
    else:
        assert faults >= PAGES // 2


def test_another_c_library_is_left_alone_with_a_log_line(monkeypatch, caplog):
    monkeypatch.setattr(heap.platform, "libc_ver", lambda: ("musl", "1.2"))
    with caplog.at_level(logging.INFO, logger="blip_fast"):
        assert not heap.keep_freed_memory()
    assert "not glibc" in caplog.text


@pytest.mark.parametrize("levers", [StepLevers(), StepLevers.official()], ids=["on", "off"])
def test_build_trainer_keeps_freed_memory_on_the_cpu_where_the_lever_says(
    levers, tiny_config, tmp_path, monkeypatch
):
    calls = []
    monkeypatch.setattr(main, "keep_freed_memory", lambda: calls.append(1))
    build_trainer("retrieval", tiny_config, tmp_path, num_workers=0, levers=levers)
    assert len(calls) == int(levers.keep_freed_memory)
