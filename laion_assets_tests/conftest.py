"""Fixtures start real things: an HTTP image server on 127.0.0.1, Delta lakes in tmp_path,
Dagster instances (instance_for_test). LAION's real data files come from ../shared when it is
beside the checkout (as in CI); tests that check against them skip with the reason where it is
not, and the others run everywhere: the demo's heads travel with the project (models/), and
the ViT-B/32 heads the pipeline tests score with are written in LAION's layout when absent."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import pytest
from dagster import AssetKey

os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations asks PyPI on import

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
DATA = SHARED / "data"
BUNDLED = REPO / "models"  # the demo's LAION heads, shipped with the project


_running: list[pytest.Item | None] = [None]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _running[0] = item  # before its fixtures, which may read ../shared too


def shared_file(*parts: str) -> Path:
    """A file of ../shared (LAION's real data and heads). The test skips, saying so, without it
    (CI sets LAION_ASSETS_REQUIRE_SHARED: there a missing file fails). Only tests marked
    `shared` may read it: CI runs exactly those beside ../shared (`pytest -m shared`)."""
    item = _running[0]
    if item is not None and item.get_closest_marker("shared") is None:
        raise RuntimeError(f"{item.nodeid} reads ../shared: mark it @pytest.mark.shared")
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("LAION_ASSETS_REQUIRE_SHARED"):
            pytest.fail(f"{path} is missing, and LAION_ASSETS_REQUIRE_SHARED is set")
        pytest.skip(f"checks against LAION's real files: needs {path} (../shared beside the checkout, as in CI)")
    return path


@functools.cache
def b32_heads() -> dict[str, Path]:
    """The ViT-B/32 aesthetic (V1) and NSFW heads the pipeline tests score with: LAION's files
    from ../shared, else files in the same layout (keys, shapes) with seeded weights, whose
    scores sit in the real heads' range (aesthetic about 5, punsafe well below 0.99)."""
    real = {
        "aesthetic": SHARED / "models/laion-aesthetic-predictor/sa_0_4_vit_b_32_linear.pth",
        "punsafe": SHARED / "models/clip-based-nsfw-detector/clip_ViT-B-32_openai_binary_nsfw_head.pth",
    }
    if all(p.is_file() for p in real.values()):
        return real
    import torch

    g = torch.Generator().manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="laion-heads-"))
    layouts = {
        "aesthetic": {"weight": torch.randn(1, 512, generator=g) * 0.05, "bias": torch.tensor([5.0])},
        "punsafe": {
            "norm.mean": torch.zeros(512), "norm.variance": torch.ones(512),
            "linear_1.weight": torch.randn(32, 512, generator=g) * 0.05, "linear_1.bias": torch.zeros(32),
            "linear_2.weight": torch.randn(32, 32, generator=g) * 0.1, "linear_2.bias": torch.zeros(32),
            "linear_3.weight": torch.randn(1, 32, generator=g) * 0.1, "linear_3.bias": torch.tensor([-1.0]),
        },
    }
    for name, state in layouts.items():
        torch.save(state, folder / real[name].name)
    return {name: folder / real[name].name for name in real}


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


def asset_key(table: str) -> AssetKey:
    """The asset of a lake table or export folder (defs/keys.py: `embeddings/b32` is the asset
    `embeddings_b32`, `webdataset/x` is `webdataset_x`; most tables are their own key)."""
    from laion_assets.defs import keys

    kind, _, name = table.partition("/")
    named = {"embeddings": keys.embeddings_key, "webdataset": keys.webdataset_key, "knn": keys.knn_key}
    if kind in named:
        return named[kind](name)
    if table.startswith("curation/semdedup/"):
        return keys.semdedup_key(table.rsplit("/", 1)[1])
    return AssetKey(table.split("/"))


def make_config(**overrides) -> PipelineConfig:
    """Offline pipeline config: 127.0.0.1 allowed, one tiny CLIP space `tiny`, B/32 heads
    (`b32_heads`, fed the tiny space)."""
    scores = ScoresConfig(
        heads={name: HeadConfig(path=str(path)) for name, path in b32_heads().items()},
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
