"""``python -m benchmarks <name> [OPTIONS]``, run from the checkout's root."""

from benchmarks.cli import app

app(prog_name="python -m benchmarks")
