"""What every result file records about the code it measured."""

from __future__ import annotations

import argparse
import os
import subprocess

from common import HERE

from tqcompressor.versions import library_versions, machine_record


def git_commit() -> str:
    """HEAD, marked ``+uncommitted`` when tracked files differ from it. Call it when a run starts:
    that is the code the run imports. Where the tree is a copy (a lent GPU machine carries the
    working tree beside a ``.git`` of an earlier commit), the caller states the commit in ``BENCH_COMMIT``."""
    if os.environ.get("BENCH_COMMIT"):  # the tree is a copy (a lent GPU machine), whose .git may be stale or absent
        return os.environ["BENCH_COMMIT"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    if not head:
        return "unknown (no git repository; set BENCH_COMMIT)"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True, text=True
    ).stdout.strip()
    return head + ("+uncommitted" if dirty else "")


def cpu_run(commit: str, args: argparse.Namespace) -> dict:
    """The head of a result file measured on this machine's CPU: the commit, every setting (all of
    ``args`` but ``--out``), the library versions and the machine."""
    return {
        "commit": commit,
        "settings": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "versions": library_versions(),
        "device": "cpu",
        "cpu": machine_record(),
    }
