"""Pure-Python pipeline logic: no Dagster imports here, so every piece is testable alone."""
