"""Does a run survive `kill -9` at any moment? Starts a short SFT run that checkpoints every 2 steps, kills it with
SIGKILL at a random moment (a rank, the launcher, or the whole process tree as a lost machine would; often in the
middle of a save), then resumes it and checks that it completes. Repeats N times and prints what happened.

    python bench/kill_resume.py --tries 20 [--seed 0] [extra overrides ...]

Exit code 0 when every killed run resumed to completion.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
RUN = [sys.executable, "-m", "runner", "debug=quick", "train.save_every=2", "train.keep_last=2", "train.eval_every=0"]


def command_line(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):  # (a process that just ended)
        return ""


def victims(driver: psutil.Process) -> dict[str, list[psutil.Process]]:
    tree = driver.children(recursive=True)
    ranks = [p for p in tree if "runner.worker" in command_line(p)]
    launcher = [p for p in tree if "deepspeed" in command_line(p) and p not in ranks]
    return {"rank": ranks[:1], "launcher": launcher[:1], "everything": [driver, *tree]}


def one_try(n: int, rng: random.Random, root: Path, extra: list[str]) -> dict:
    run = root / f"run{n}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = open(root / f"run{n}.log", "w")
    proc = subprocess.Popen([*RUN, f"run_dir={run}", *extra], cwd=root, env=env, stdout=log, stderr=log)
    # wait until the ranks train (the first checkpoint exists), then kill at a random moment of the run
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "latest").exists() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    what = rng.choice(["rank", "launcher", "everything"])
    killed = 0
    if proc.poll() is None:
        for p in victims(psutil.Process(proc.pid))[what]:
            try:
                p.send_signal(signal.SIGKILL)
                killed += 1
            except psutil.NoSuchProcess:
                pass
    proc.wait(timeout=180)
    for p in psutil.process_iter(["cmdline"]):  # what a lost machine would not leave running
        if str(run) in " ".join(p.info["cmdline"] or []):
            p.kill()
    steps_before = (
        (run / "checkpoints" / "latest").read_text().strip() if (run / "checkpoints" / "latest").exists() else None
    )
    again = subprocess.run([*RUN[:3], f"resume={run}"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    status = json.loads((run / "status.json").read_text())["status"] if (run / "status.json").exists() else None
    ok = again.returncode == 0 and status == "completed"
    if killed == 0:  # it ended before the kill: a finished run (or one with no checkpoint) is refused, cleanly
        ok = again.returncode == 2 and "Traceback" not in again.stderr
    return {
        "try": n,
        "killed": what if killed else "nothing (it had ended)",
        "latest_before": steps_before,
        "resume_rc": again.returncode,
        "status": status,
        "ok": ok,
        "error": "" if ok else (again.stderr or again.stdout)[-400:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    results = []
    for n in range(args.tries):
        r = one_try(n, rng, root, args.overrides)
        results.append(r)
        print(
            f"try {n:2d}: killed {r['killed']:<24} latest before {r['latest_before'] or '-':<8} resume exit "
            f"{r['resume_rc']:>3}  status {r['status']!s:<10} {'ok' if r['ok'] else 'FAILED: ' + r['error']}",
            flush=True,
        )
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} of {len(results)} killed runs resumed to completion (runs in {root})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
