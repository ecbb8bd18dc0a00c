"""The ``partitioner`` command line (typer + rich): one module per command group; the only place that prints."""
