"""Runs pytest so that a test which kills the process (a segfault, an abort) costs that test, not the run.

    python scripts/run_tests_resilient.py [--budget SECONDS] [--workers N] -- <pytest arguments>

(--budget defaults to $FASTCONV_STEP_LIMIT - 10 when that is set, as scripts/device_check.sh does.)
--workers N runs the tests in N pytest-xdist processes where pytest-xdist is installed (the GPU machines have
it): a crash then costs one worker, which xdist replaces, and the crashed test is reported as failed.

The device check uses it: on the 2026-11-28 H100 build every C++ argument error crashed the process, and the
first such test ended the GPU test run at 44%. Here pytest runs with this file as a plugin that records, as
it goes, each test's start and outcome in a progress file. When pytest dies, the test that had started but not
finished is recorded as crashed, and pytest runs again with the finished and crashed tests deselected, until
a run ends normally or the budget is spent. Prints a summary line: passed, failed, skipped, crashed (named).
Exit status: 0 when nothing failed or crashed, 1 otherwise.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

PROGRESS_ENV = "FASTCONV_TEST_PROGRESS"


# ---- the plugin side (inside pytest) -------------------------------------------------------------------------


def _record(entry: dict) -> None:
    with open(os.environ[PROGRESS_ENV], "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())  # the next instruction may be the crash


def pytest_runtest_logstart(nodeid, location):
    if PROGRESS_ENV in os.environ:
        _record({"start": nodeid})


def pytest_runtest_logreport(report):
    if PROGRESS_ENV not in os.environ:
        return
    if report.when not in ("setup", "call", "teardown"):  # pytest-xdist's report of a test that killed its worker
        _record({"done": report.nodeid, "outcome": "crashed"})
    elif report.when == "call" or not report.passed:
        outcome = report.outcome if report.when == "call" else ("skipped" if report.skipped else "error")
        _record({"done": report.nodeid, "outcome": outcome})


# ---- the driver side ---------------------------------------------------------------------------------------------


def parallel(workers: int) -> list[str]:
    if workers <= 1:
        return []
    try:
        import xdist  # noqa: F401
    except ImportError:
        print("run_tests_resilient: pytest-xdist is not installed; running in one process", flush=True)
        return []
    return ["-n", str(workers), "--max-worker-restart", "1000"]


def main(argv: list[str]) -> int:
    budget = float("inf")
    if os.environ.get("FASTCONV_STEP_LIMIT"):  # the device check's step limit: finish (and summarise) inside it
        budget = float(os.environ["FASTCONV_STEP_LIMIT"]) - 10
    if argv[:1] == ["--budget"]:
        budget, argv = float(argv[1]), argv[2:]
    workers = 1
    if argv[:1] == ["--workers"]:
        workers, argv = int(argv[1]), argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    start = time.time()
    progress = os.path.abspath(os.environ.get("FASTCONV_TEST_PROGRESS_FILE", "test-progress.jsonl"))
    open(progress, "w").close()
    env = {**os.environ, PROGRESS_ENV: progress,
           "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)),
                                                       os.environ.get("PYTHONPATH")]))}
    outcomes: dict[str, str] = {}
    crashed: list[str] = []
    runs = 0
    while True:
        runs += 1
        deselect = [arg for nodeid in list(outcomes) + crashed for arg in ("--deselect", nodeid)]
        left = budget - (time.time() - start)
        if left < 10:
            print(f"run_tests_resilient: budget spent after {runs - 1} runs", flush=True)
            break
        command = [sys.executable, "-m", "pytest", "-p", "run_tests_resilient", *parallel(workers), *argv, *deselect]
        try:
            rc = subprocess.run(command, env=env, timeout=None if left == float("inf") else left).returncode
        except subprocess.TimeoutExpired:
            print("run_tests_resilient: pytest ran past the budget", flush=True)
            rc = None
        started = None
        with open(progress) as f:
            for line in f:
                entry = json.loads(line)
                if "start" in entry:
                    started = entry["start"]
                else:
                    outcomes[entry["done"]] = entry["outcome"]
                    started = None if started == entry["done"] else started
        open(progress, "w").close()
        died = rc is not None and (rc < 0 or rc >= 128 or (rc not in (0, 1, 5) and started is not None))
        if not died or started is None:
            break
        crashed.append(started)
        print(f"\nrun_tests_resilient: pytest died (status {rc}) in {started}; running the rest again\n", flush=True)
    crashed += [nodeid for nodeid, outcome in outcomes.items() if outcome == "crashed"]
    counts = {k: sum(1 for v in outcomes.values() if v == k) for k in ("passed", "failed", "skipped", "error")}
    print(f"run_tests_resilient: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped, "
          f"{counts['error']} errors, {len(crashed)} crashed the process, in {runs} pytest runs")
    for nodeid in crashed:
        print(f"  CRASHED {nodeid}")
    for nodeid, outcome in outcomes.items():
        if outcome in ("failed", "error"):
            print(f"  {outcome.upper()} {nodeid}")
    return 0 if not crashed and not counts["failed"] and not counts["error"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
