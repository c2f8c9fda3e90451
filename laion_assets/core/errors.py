"""User-facing errors: one line saying what is wrong and how to fix it."""


class LaionAssetsError(Exception):
    """Bad input or configuration. The message is shown to the user as-is, on one line."""


class ValidationFailed(LaionAssetsError):
    """A shard failed its data-quality gate and was not published.

    Carries the gate's report (each expectation with its threshold and observed value) and the
    stage's figures (status counts, top errors...), so the failure shows its cause."""

    def __init__(self, stage: str, shard: str, failures: list[str], report=None, stats: dict | None = None):
        self.stage, self.shard, self.failures = stage, shard, failures
        self.report, self.stats = report, stats or {}
        super().__init__(
            f"{stage} shard '{shard}' failed validation, not published: " + "; ".join(failures)
        )
