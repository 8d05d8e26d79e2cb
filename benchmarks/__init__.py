"""edge-bench: the runtime's benchmark harness (engine, overhead, pipeline, uplink, decode, startup).

Each measurement runs in a fresh process (`python -m benchmarks.<kind> ... --json`), discards its warm-up and
is repeated; `benchmarks.cli` runs them, takes the median of the repeats with their spread, and writes JSON,
Markdown and PNG plots (`benchmarks.report`). The daemon never imports this package.
"""

SCHEMA_VERSION = 1
