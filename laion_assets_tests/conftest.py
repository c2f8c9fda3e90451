"""Fixtures start real things: an HTTP image server on 127.0.0.1, Delta lakes in tmp_path,
Dagster instances (instance_for_test); the real LAION heads and data come from ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

from laion_assets.core.config import PipelineConfig  # noqa: E402
from laion_assets.core.embeddings.config import EmbeddingConfig, SpaceConfig  # noqa: E402
from laion_assets.core.exports.config import ExportConfig, KnnConfig  # noqa: E402
from laion_assets.core.images.config import DownloadConfig  # noqa: E402
from laion_assets.core.ingest.sample import SampleServer, build_site, sample_rows  # noqa: E402
from laion_assets.core.lake.delta import Lake  # noqa: E402
from laion_assets.core.scores.config import HeadConfig, ScoresConfig  # noqa: E402
from laion_assets.core.subsets.rules import SubsetConfig  # noqa: E402

# session fixtures of their own modules: `testsite` (the hostile HTTP server), `planted` (a lake
# with planted neighbours)
pytest_plugins = ["laion_assets_tests.faultsite", "laion_assets_tests.synthetic"]

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LAION_ASSETS_SHARED", REPO.parent / "shared"))
MODELS = SHARED / "models"
DATA = SHARED / "data"


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared beside the checkout)")
    return path


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("site")
    return root, build_site(root, n_generated=12)


@pytest.fixture(scope="session")
def server(site):
    with SampleServer(site[0]) as srv:
        yield srv


@pytest.fixture
def shard_rows(site, server):
    """A LAION-style shard over the test server: photos, generated images and every fault."""
    return sample_rows(site[1], server.base_url)


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(tmp_path / "lake")


def make_config(**overrides) -> PipelineConfig:
    """Offline pipeline config: 127.0.0.1 allowed, one tiny CLIP space `tiny`, real B/32 heads
    (space override)."""
    scores = ScoresConfig()
    if (MODELS / "clip-based-nsfw-detector").is_dir():
        scores = ScoresConfig(
            heads={
                "aesthetic": HeadConfig(path=str(MODELS / "laion-aesthetic-predictor/sa_0_4_vit_b_32_linear.pth")),
                "punsafe": HeadConfig(path=str(MODELS / "clip-based-nsfw-detector/clip_ViT-B-32_openai_binary_nsfw_head.pth")),
            },
            allow_embedding_space_mismatch=True,
        )
    base = dict(
        download=DownloadConfig(allowed_networks=("127.0.0.1/32",), retries=0, min_success_rate=0.5, chunk_rows=16),
        embeddings=EmbeddingConfig(spaces={"tiny": SpaceConfig(model="tiny")}, batch_size=16, chunk_rows=32),
        scores=scores,
        subsets=(
            SubsetConfig(name="similar", min_similarity=-1.0, max_punsafe=0.99),
            SubsetConfig(name="pretty", min_aesthetic=3.5),
        ),
        # no webdataset export or kNN index unless a test asks for them (test_train does)
        export=ExportConfig(subsets=()),
        knn=KnnConfig(subsets=()),
    )
    base.update(overrides)
    return PipelineConfig(**base)


@pytest.fixture
def config() -> PipelineConfig:
    return make_config()


def write_config(path: Path, cfg: PipelineConfig) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    return path


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on 127.0.0.1 for the whole session; tests create their own database."""
    from laion_assets_tests.servers import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis():
    """A Redis server on 127.0.0.1 (and a unix socket) for the whole session."""
    from laion_assets_tests.servers import RedisServer

    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def moto_s3(monkeypatch):
    """A moto S3 server on 127.0.0.1 with a bucket `laion`; the AWS_* variables point at it."""
    import boto3

    from laion_assets_tests.servers import MotoServer

    server = MotoServer().start()
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket="laion")
    yield server
    server.stop()
