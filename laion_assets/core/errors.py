"""User-facing errors: one line saying what is wrong and how to fix it."""


class LaionAssetsError(Exception):
    """Bad input or configuration. The message is shown to the user as-is, on one line."""


class ValidationFailed(LaionAssetsError):
    """A shard failed its data-quality gate and was not published."""

    def __init__(self, stage: str, shard: str, failures: list[str]):
        self.stage, self.shard, self.failures = stage, shard, failures
        super().__init__(
            f"{stage} shard '{shard}' failed validation, not published: " + "; ".join(failures)
        )
