"""The chaos soak, short form: 4 prefork workers and the reaper run 1,500 mixed tasks
(plain, reliable, ordered, rate-limited, breaker-guarded, doomed) while workers are
``kill -9``ed and restarted, one gets SIGTERM and the coordination Redis restarts; every
task is accounted for (see ``bench/soak.py``). The long form is ``python -m bench.soak``.
"""

from __future__ import annotations

import os

import pytest

from bench.soak import Soak

#: Seed of the CI run (``RELIABLE_SOAK_SEED`` replays another).
SEED = int(os.environ.get("RELIABLE_SOAK_SEED", "7"))


@pytest.mark.timeout(300)
def test_short_soak_accounts_for_every_task(tmp_path):
    soak = Soak(tasks=1500, seed=SEED, kills=4, workers=4, publish_rate=40.0, log_dir=tmp_path)
    report = soak.run()
    print(report.text())
    assert report.kills == 4 and report.sigterms == 1 and report.store_restarts == 1
    assert report.ok, report.text()
