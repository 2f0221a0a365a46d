"""The pipeline around `method`: config, CLI, tracking, sweeps, export, reproduce."""

import time

# When this process began its imbcil work (the first pipeline import): a dry run's start-up figure.
STARTED = time.perf_counter()
