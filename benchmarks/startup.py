"""Seconds from a new `imbcil run` process to its first training step.

    PYTHONPATH=. python benchmarks/startup.py --data-root ../shared/data --repeats 3

Each repeat starts a fresh Python process that runs `imbcil run configs/quickstart.yaml` as the
command line would, and stops it at the first training step, printing the time since the process
began (its interpreter start, the imports, the config, the data, the store check, the run's
creation). The first repeat fills the decoded-data cache and creates the SQLite store if they
are cold; the later ones show a warm start. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Runs inside the child: the first training step reports the elapsed time and ends the process.
CHILD = """
import os, sys, time
started = float(sys.argv[1])
import method.trainer as trainer

def first_step(self, *args, **kwargs):
    print(f"first training step after {time.time() - started:.2f} s", flush=True)
    os._exit(0)

trainer.IncrementalTrainer._train = first_step
from pipeline.cli import main
sys.argv = ["imbcil", *sys.argv[2:]]
main()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="imbcil-startup-") as folder:
        command = [
            "run", str(repo / "configs/quickstart.yaml"), "--data-root", args.data_root,
            "--tracking-uri", f"sqlite:///{Path(folder) / 'mlflow.db'}", "--phase-store", "off",
        ]  # fmt: skip
        for repeat in range(args.repeats):
            result = subprocess.run(
                [sys.executable, "-c", CHILD, repr(time.time()), *command], cwd=repo, capture_output=True, text=True
            )
            line = next((l for l in result.stdout.splitlines() if l.startswith("first training step")), None)
            print(f"repeat {repeat + 1}: {line or 'no training step: ' + (result.stderr.strip().splitlines() or ['?'])[-1]}")


if __name__ == "__main__":
    main()
