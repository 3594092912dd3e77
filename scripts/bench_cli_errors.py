"""How long each command takes to report a bad setting (issue 26: goal under 4 s on a 2-core machine).

    python scripts/bench_cli_errors.py [--repeat 3]

Runs each CLI with a few bad settings in a fresh process (as a user would) and prints the median wall time of
each against the goal, beside a reference measured in the same run: ``python -c "import torch"`` and
``python -c "import lightning"`` (what an error found after those imports would cost at least). The figures
depend on the machine's load: on a shared machine, compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 4.0
CASES = [
    ("train.py", ["experiment=demo", "optim.lr=-1"], "a bad number"),
    ("train.py", ["experiment=demo", "model.n_heads=0"], "a bad model shape"),
    ("train.py", ["experiment=demo", "model=nope"], "an unknown option"),
    ("train.py", ["experiment=demo", "model.bogus=1"], "an unknown key"),
    ("train.py", ["experiment=demo", "ckpt_path=/nonexistent.ckpt"], "a missing ckpt_path"),
    ("generate.py", ["ckpt=/nonexistent", "prompt=hi"], "a missing checkpoint"),
    ("generate.py", ["bogus=1"], "an unknown key"),
    ("scripts/export.py", ["ckpt=/nonexistent", "format=hf", "out=/tmp/x"], "a missing checkpoint"),
    ("scripts/export.py", ["ckpt=x", "format=nope", "out=/tmp/x"], "an unknown format"),
    ("scripts/prepare.py", ["data=nope"], "an unknown option"),
    ("scripts/evaluate.py", ["bogus=1"], "an unknown key"),
]


def timed(cmd: list[str], cwd: str, env: dict) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    first = next((line for line in done.stderr.splitlines() if line.startswith("error:")), "")
    return time.perf_counter() - t0, done.returncode, first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (the median is shown)")
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "disabled"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env["HOME"] = tmp
        for name, code in (("reference: import torch", "import torch"),
                           ("reference: import lightning", "import lightning")):
            times = [timed([sys.executable, "-c", code], tmp, env)[0] for _ in range(args.repeat)]
            rows.append((name, "", statistics.median(times), None, ""))
        for script, extra, what in CASES:
            runs = [timed([sys.executable, str(ROOT / script), *extra, f"hydra.run.dir={tmp}/run"], tmp, env)
                    for _ in range(args.repeat)]
            rows.append((f"{script} {' '.join(extra)}", what, statistics.median(r[0] for r in runs), runs[0][1],
                         runs[0][2][:70]))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine: other work "
          "slows every row alike)")
    print(f"{'command':62} {'mistake':20} {'median s':>8} {'goal':>6} {'exit':>4}  first error line")
    failed = 0
    for cmd, what, t, rc, line in rows:
        ok = "" if rc is None else ("ok" if t < GOAL_S and rc == 1 else "SLOW" if rc == 1 else "NO ERR")
        failed += ok not in ("", "ok")
        print(f"{cmd[:62]:62} {what:20} {t:8.2f} {ok:>6} {'' if rc is None else rc:>4}  {line}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
