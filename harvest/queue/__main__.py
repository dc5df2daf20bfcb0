"""`python -m harvest.queue ARGS` runs `harvest work --local ARGS` (for supervisors and tests)."""

import sys

from harvest.cli import app

app(["work", "--local", *sys.argv[1:]], prog_name="python -m harvest.queue")
