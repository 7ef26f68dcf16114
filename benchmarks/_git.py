"""Git queries behind result provenance (standard library only: ``tables.py`` runs without torch).

A tree is clean when ``git status --porcelain`` lists nothing, untracked files included, apart
from benchmarks/results/: the results are the benchmarks' output, not their input, and a run of
several benchmarks writes them one after another.
"""

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_SUBDIR = "benchmarks/results"


def git(*args: str, repo: str = REPO) -> str:
    """stdout of ``git args`` run in ``repo``; a failure raises naming the command and git's
    message."""
    try:
        proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(f"cannot run git in {repo}: {e}") from e
    if proc.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {proc.stderr.strip()}")
    return proc.stdout


def head(repo: str = REPO) -> str:
    return git("rev-parse", "HEAD", repo=repo).strip()


def uncommitted(repo: str = REPO) -> list[str]:
    """``git status --porcelain`` lines (modified, staged, deleted or untracked paths) outside
    benchmarks/results/."""
    # every untracked file listed by name: a new folder holding results and code is both
    lines = git("status", "--porcelain", "--untracked-files=all", repo=repo).splitlines()
    return [line for line in lines if not line[3:].startswith(RESULTS_SUBDIR + "/")]


def is_ancestor(commit: str, repo: str = REPO) -> bool:
    """Whether ``commit`` exists and is HEAD or one of its ancestors."""
    proc = subprocess.run(
        ["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=repo, capture_output=True
    )
    return proc.returncode == 0


def later_changes(since: str, paths: list[str], repo: str = REPO) -> dict[str, list[str]]:
    """Commits after ``since`` (exclusive) up to HEAD that changed any of ``paths`` (git
    pathspecs), newest first, each with the files of ``paths`` it changed."""
    out = git("log", "--format=%x00%H", "--name-only", f"{since}..HEAD", "--", *paths, repo=repo)
    changes = {}
    for entry in out.split("\0")[1:]:
        commit, *files = [line for line in entry.splitlines() if line]
        changes[commit] = files
    return changes
