"""One worker process of ``lmconform bench run --processes N``.

``python -m benchmarks.runner_worker JOB.json``: loads the engines from their spec
texts, warms up and measures its share of blocks into the run named in the job, then
writes its outcome (errors, skips, last block numbers) to the job's result file.
Progress goes to stderr, which the parent shares with it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import runner
from benchmarks.history import History


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    with History(job["db"]) as store:
        outcome = runner.run_worker(job, store, runner.Progress())
    Path(job["result"]).write_text(runner.outcome_to_json(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
