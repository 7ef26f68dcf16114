"""README's benchmark tables: generated from benchmarks/results/*.json by benchmarks/tables.py,
which refuses results measured on a dirty tree or older than the code they measure.

The first test checks the committed README against the committed results; the others run the
refusal rules and the rendering on synthetic results in a throw-away git repository.
"""

import json
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import _git  # noqa: E402
import _harness  # noqa: E402
import tables  # noqa: E402


def test_readme_tables_match_committed_results(capsys):
    rc = tables.main(["--check"])
    assert rc == 0, capsys.readouterr().err


def git(repo, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def commit_file(repo, path, text):
    full = os.path.join(repo, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "w", encoding="utf-8") as f:
        f.write(text)
    git(repo, "add", path)
    git(repo, "commit", "-q", "-m", f"change {path}")
    return _git.head(repo)


@pytest.fixture
def repo(tmp_path):
    """A git repository with a measured source, an unrelated file and a README holding every
    table's markers."""
    root = str(tmp_path)
    git(root, "init", "-q")
    readme = "\n\n".join(f"<!-- bench:{name} -->\n<!-- /bench:{name} -->" for name in tables.TABLES)
    commit_file(root, "README.md", f"# project\n\n{readme}\n")
    commit_file(root, "other.py", "x = 1\n")
    commit_file(root, "src/op.py", "def op(): pass\n")
    os.makedirs(os.path.join(root, _git.RESULTS_SUBDIR))
    return root


def write_result(
    repo, commit, dirty=False, dry_run=False, name="attention", device="cpu", filename=None
):
    """An attention result measuring src/op.py: reference, sdpa (the faster baseline) and cpu."""
    rows = [
        {"case": "fwd 2x12x35x35", "provider": provider, "median_ms": ms}
        for provider, ms in (("reference", 10.0), ("sdpa", 4.0), ("cpu", 2.0))
    ]
    _harness.add_ratios(rows, ("reference", "sdpa"))
    result = {
        "benchmark": name,
        "provenance": {
            "commit": commit,
            "dirty": dirty,
            "dry_run": dry_run,
            "date": "2026-12-03T10:00:00+00:00",
            "device": device,
            "device_name": "Test CPU, 2 cores",
            "torch": "2.13.0+cpu",
            "cuda": None,
            "threads": 2,
            "command": "python -m pytest benchmarks/bench_attention.py",
            "sources": ["src/op.py"],
        },
        "reference": "reference",
        "baselines": ["reference", "sdpa"],
        "time_key": "median_ms",
        "rows": rows,
    }
    filename = filename or f"{name}-{device}.json"
    with open(os.path.join(repo, _git.RESULTS_SUBDIR, filename), "w", encoding="utf-8") as f:
        json.dump(result, f)
    return filename


def load(repo):
    return tables.load_results(os.path.join(repo, _git.RESULTS_SUBDIR), repo)


def test_fresh_result_is_accepted_after_unrelated_commits(repo):
    filename = write_result(repo, _git.head(repo))
    commit_file(repo, "other.py", "x = 2\n")
    assert list(load(repo)) == [filename]


def test_dirty_result_is_refused(repo):
    write_result(repo, _git.head(repo), dirty=True)
    with pytest.raises(tables.Refused, match=r"attention-cpu\.json: measured on a dirty tree"):
        load(repo)


def test_dry_run_is_refused(repo):
    write_result(repo, _git.head(repo), dry_run=True)
    with pytest.raises(tables.Refused, match=r"attention-cpu\.json: a dry run"):
        load(repo)


def test_stale_result_is_refused_naming_the_changed_source(repo):
    write_result(repo, _git.head(repo))
    newer = commit_file(repo, "src/op.py", "def op(): return 1\n")
    with pytest.raises(tables.Refused, match=rf"attention-cpu\.json: stale.*{newer[:12]}.*op\.py"):
        load(repo)


def test_stale_result_of_a_device_this_machine_lacks_is_kept_with_a_warning(repo, capsys):
    filename = write_result(repo, _git.head(repo), device="cuda")
    commit_file(repo, "src/op.py", "def op(): return 1\n")
    if "cuda" in tables.devices_here():
        pytest.skip("this machine has a GPU: its stale GPU results are refused")
    assert list(load(repo)) == [filename]
    assert f"warning: {filename}: stale" in capsys.readouterr().err


def test_result_from_a_commit_outside_history_is_refused(repo):
    write_result(repo, "0123456789abcdef" * 2 + "01234567")
    with pytest.raises(tables.Refused, match="not in HEAD's history"):
        load(repo)


def test_result_without_provenance_or_under_a_wrong_name_is_refused(repo):
    write_result(repo, _git.head(repo), filename="attention-cuda.json")
    with open(os.path.join(repo, _git.RESULTS_SUBDIR, "itc-cpu.json"), "w") as f:
        json.dump({"meta": {}, "rows": []}, f)
    with pytest.raises(tables.Refused) as refused:
        load(repo)
    assert "attention-cuda.json: holds benchmark 'attention' on cpu" in str(refused.value)
    assert "itc-cpu.json: no provenance" in str(refused.value)


def test_rendering_is_deterministic_and_check_detects_drift(repo, capsys):
    write_result(repo, _git.head(repo))
    readme_path = os.path.join(repo, "README.md")
    with open(readme_path, encoding="utf-8") as f:
        readme = f.read()
    results = load(repo)
    rendered = tables.render(readme, results)
    assert rendered == tables.render(readme, load(repo))
    # the cpu provider is blip-fast's: 5x the reference, 2x the faster baseline (sdpa)
    assert "| `attention` | cpu | fwd 2x12x35x35 | 10.0 ms | `sdpa` 4.00 ms | `cpu` 2.00 ms |" in (
        rendered
    )
    assert "| **5.00x** | 2.00x |" in rendered
    assert tables.main(["--check"], repo=repo) == 1
    assert tables.main([], repo=repo) == 0
    assert tables.main(["--check"], repo=repo) == 0
    with open(readme_path, encoding="utf-8") as f:
        assert f.read() == rendered
    with open(readme_path, "a", encoding="utf-8") as f:
        f.write("edited\n")
    with open(readme_path, encoding="utf-8") as f:
        edited = f.read()
    assert tables.render(edited, results) == edited  # text outside the markers is kept
    with open(readme_path, "w", encoding="utf-8") as f:
        f.write(edited.replace("10.0 ms", "9.0 ms"))
    assert tables.main(["--check"], repo=repo) == 1
    assert "out of date" in capsys.readouterr().err


def test_readme_markers_must_match_the_tables(repo):
    with pytest.raises(tables.Refused, match="missing benchmark table markers: .*ops"):
        tables.render("<!-- bench:demo -->\n<!-- /bench:demo -->\n", {})


def test_clean_tree_ignores_results_but_not_untracked_files(repo):
    write_result(repo, _git.head(repo))
    assert _git.uncommitted(repo) == []
    with open(os.path.join(repo, "new.py"), "w") as f:
        f.write("")
    assert _git.uncommitted(repo) == ["?? new.py"]


def test_ratios_are_against_the_reference_and_the_fastest_baseline():
    rows = [
        {"case": "c", "provider": provider, "median_ms": ms}
        for provider, ms in (("reference", 8.0), ("sdpa", 2.0), ("cpu", 1.0))
    ]
    _harness.add_ratios(rows, ("reference", "sdpa"))
    cpu = rows[2]
    assert (cpu["speedup_vs_reference"], cpu["best_baseline"]) == (8.0, "sdpa")
    assert cpu["speedup_vs_best_baseline"] == 2.0
    with pytest.raises(ValueError, match="reference 'reference' was not measured"):
        _harness.add_ratios(rows[1:], ("reference", "sdpa"))
