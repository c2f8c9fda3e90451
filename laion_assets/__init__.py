"""laion_assets: LAION-style image-text datasets as a Dagster-orchestrated Delta Lake."""

__version__ = "0.1.0"
