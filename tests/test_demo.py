"""The README's first command, ``bash examples/demo.sh``, runs end to end and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_demo_runs_end_to_end():
    env = dict(os.environ)
    if sys.prefix != sys.base_prefix:  # reuse the venv running the tests (else ROOT/.venv)
        env["RELIABLE_VENV"] = sys.prefix
    done = subprocess.run(
        ["bash", "examples/demo.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "2 shipped, 1 dead-lettered" in out
    assert "dead_letter_for" in out and "SKU 'lamp' is not in the catalog" in out
    assert "1 replayed" in out
    assert "shipped order-2: lamp (replayed from dead letter" in out
    assert "3 shipped, 0 dead-lettered" in out and out.rstrip().endswith("stopped")
    # act 7: the killed worker's task ran again on the second worker, recovered by the reaper
    assert "started  on shop@" in out and "packed   on shop2@" in out
    assert "reaper: recovered shop.pack_order[" in out
    assert "the task ran again" in out
