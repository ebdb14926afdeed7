"""The folder `bq-audit run` puts on `PYTHONPATH` (see `global_hook.BOOTSTRAP_DIR`)."""
