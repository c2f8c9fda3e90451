"""Bad input, as a new user meets it: every refused file exits 2 naming the place and stays
unregistered, skipped files are listed with the reason, a shard without usable rows fails its
gate with the reason, and a refused file's key can be used by a corrected file."""

from __future__ import annotations

import gzip

import polars as pl
import pytest

from laion_assets.cli import main
from laion_assets.cli.pipeline import run_pipeline
from laion_assets.core import stages
from laion_assets.core.ingest import registry
from laion_assets.core.ingest.config import IngestConfig
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError, ValidationFailed
from laion_assets.core.stages.raw_urls import RAW_URLS_REJECTED, input_row_fates
from laion_assets_tests.conftest import make_config, write_config

GOOD = pl.DataFrame({"URL": ["https://a.example/1.jpg", "https://a.example/2.jpg"], "TEXT": ["one", "two"]})


@pytest.fixture
def setup(tmp_path):
    lake = Lake(tmp_path / "lake")
    good = tmp_path / "good" / "part-1.parquet"
    good.parent.mkdir()
    GOOD.write_parquet(good)
    registry.register(lake, [str(good)])
    stages.run_raw_urls(lake, make_config(), "part-1")  # a published shard that must stay as it is
    return lake, tmp_path, write_config(tmp_path / "cfg.yaml", make_config())


@pytest.mark.parametrize("name, data, message", [
    ("bad-1.parquet", None, "has no URL column (looked for URL, url; found link, TEXT)"),
    ("bad-1.csv", b"", "is empty"),
    ("bad-1.parquet", b"PAR1 garbage", "could not be read as parquet"),
    ("bad-1.jsonl", b'{"URL": "https://a.example/1.jpg"}\n{"URL": https://a.example/2.jpg}\n', "at line 2, column 9: Expecting value"),
    ("bad-1.csv.gz", b"not gzip", "is not valid gzip"),
    ("bad-1.csv", b"URL,TEXT\nhttps://a.example/1.jpg,caf\xe9\n", "at line 2, column 28: byte 0xe9 is not UTF-8"),
    ("bad-1.csv.gz", "flipped", "is not valid gzip (Error -3 while decompressing data"),
    ("bad-1.csv", b"URL,TEXT,URL\nhttps://a.example/1.jpg,one,https://b.example/1.jpg\n", "has the column URL more than once"),
])
def test_a_refused_file_exits_2_names_the_place_and_is_not_registered(setup, capsys, name, data, message):
    lake, tmp, cfg = setup
    bad = tmp / "bad" / name
    bad.parent.mkdir()
    if data is None:
        pl.DataFrame({"link": ["https://x.example/a.jpg"], "TEXT": ["t"]}).write_parquet(bad)
    elif data == "flipped":  # a gzip whose header is fine and whose deflate stream is damaged
        rows = b"URL,TEXT\n" + b"".join(b"https://a.example/%d.jpg,caption %d\n" % (i, i) for i in range(200))
        damaged = bytearray(gzip.compress(rows, mtime=0))
        damaged[40:48] = bytes(b ^ 0xFF for b in damaged[40:48])
        bad.write_bytes(damaged)
    else:
        bad.write_bytes(data)
    before = lake.read_shard(stages.RAW_URLS, "part-1")

    assert main(["run", str(bad.parent), "--lake", str(lake.uri), "--config", str(cfg)]) == 2

    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}") and message in err and "\n" not in err, err
    assert "bad-1" not in registry.registered(lake)
    assert lake.read_shard(stages.RAW_URLS, "part-1").equals(before)


@pytest.mark.parametrize("where", ["input", "lake"])
def test_s3_without_credentials_exits_2_naming_what_to_set(moto_s3, tmp_path, monkeypatch, capsys, where):
    """A moto server on 127.0.0.1 holds the bucket; the credentials are what is missing."""
    import boto3

    local = tmp_path / "in" / "part-1.parquet"
    local.parent.mkdir()
    GOOD.write_parquet(local)
    boto3.client("s3", endpoint_url=moto_s3.endpoint).upload_file(str(local), "laion", "input/part-1.parquet")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws either
    inputs, lake = ("s3://laion/input", str(tmp_path / "lake")) if where == "input" else (str(local.parent), "s3://laion/lake")

    assert main(["run", inputs, "--lake", lake, "--config", str(write_config(tmp_path / "cfg.yaml", make_config()))]) == 2

    err = capsys.readouterr().err.strip()
    location = inputs if where == "input" else lake
    assert err.startswith(f"error: {location}: no AWS credentials found: export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"), err
    assert "\n" not in err
    keys = boto3.client("s3", endpoint_url=moto_s3.endpoint, aws_access_key_id="test", aws_secret_access_key="test").list_objects_v2(Bucket="laion")
    assert [o["Key"] for o in keys["Contents"]] == ["input/part-1.parquet"]  # nothing written to the bucket
    assert not (tmp_path / "lake").exists()  # nor to a local lake


def test_skipped_files_are_listed_with_the_reason(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / ".part-0.csv").write_text("URL\nhttps://a.example/1.jpg\n")
    (inputs / "notes.md").write_text("hello")
    assert main(["run", str(inputs), "--lake", str(tmp_path / "lake")]) == 2
    out, err = capsys.readouterr()
    assert f"skipped {inputs / '.part-0.csv'}: hidden file (name starts with '.')" in out
    assert f"skipped {inputs / 'notes.md'}: not a shard file" in out
    assert err.startswith("error: no shard files")


def test_unknown_asset_exits_2(setup, capsys):
    lake, tmp, cfg = setup
    assert main(["run", str(tmp / "good"), "--lake", str(lake.uri), "--config", str(cfg), "--select", "raw_urls,imagez"]) == 2
    assert "unknown asset(s) imagez" in capsys.readouterr().err


def _shard(lake: Lake, path, df: pl.DataFrame) -> str:
    df.write_parquet(path)
    registry.register(lake, [str(path)])
    return path.stem


def test_a_shard_without_usable_rows_fails_its_gate_with_the_reason(tmp_path):
    lake = Lake(tmp_path / "lake")
    key = _shard(lake, tmp_path / "ints.parquet", pl.DataFrame({"URL": [1, 2, 3], "TEXT": ["a", "b", "c"]}))
    with pytest.raises(ValidationFailed) as e:
        stages.run_raw_urls(lake, make_config(), key)
    msg = str(e.value)
    assert "expect_column_values_to_be_null(kept_out_reason): 3 unexpected of 3" in msg
    assert "kept out: malformed_url 3 of 3 (e.g. URL column holds Int64 values, not text)" in msg
    assert not lake.exists(stages.RAW_URLS) and not lake.exists(RAW_URLS_REJECTED)  # nothing published
    assert key not in registry.registered(lake)  # refused: not registered any more


def test_the_usable_rows_floor_is_configurable(tmp_path):
    lake = Lake(tmp_path / "lake")
    df = pl.DataFrame({"URL": ["https://a.example/1.jpg", "ftp://b/2.jpg", "https://a.example/3.jpg", None], "TEXT": list("abcd")})
    key = _shard(lake, tmp_path / "half.parquet", df)
    out = stages.run_raw_urls(lake, make_config(), key)  # default floor 0.5: 2 of 4 kept
    assert (out.stats["input_rows"], out.stats["rows"]) == (4, 2)
    assert out.stats["kept_out"] == {"missing_url": 1, "unsupported_scheme": 1, "malformed_url": 0, "duplicate_uid": 0}
    assert lake.read_shard(RAW_URLS_REJECTED, key)["source_row"].sort().to_list() == [1, 3]
    fates = input_row_fates(lake, key)  # before the images stage ran: kept rows have no outcome yet
    assert fates.select("source_row", "stage", "outcome").rows() == [
        (0, "images", None), (1, "raw_urls", "unsupported_scheme"), (2, "images", None), (3, "raw_urls", "missing_url"),
    ]
    with pytest.raises(ValidationFailed, match="kept out: .*unsupported_scheme 1 of 4"):
        stages.run_raw_urls(lake, make_config(ingest=IngestConfig(min_usable_rate=0.9)), key)


def test_republishing_a_shard_replaces_its_kept_out_rows(tmp_path):
    lake = Lake(tmp_path / "lake")
    path = tmp_path / "s.parquet"
    key = _shard(lake, path, pl.DataFrame({"URL": ["https://a.example/1.jpg", None], "TEXT": ["a", "b"]}))
    stages.run_raw_urls(lake, make_config(), key)
    assert lake.read_shard(RAW_URLS_REJECTED, key).height == 1
    GOOD.write_parquet(path)  # the file fixed in place
    stages.run_raw_urls(lake, make_config(), key)
    assert lake.read_shard(RAW_URLS_REJECTED, key).height == 0 and lake.read_shard(stages.RAW_URLS, key).height == 2


def test_a_refused_files_key_can_be_taken_by_a_corrected_file(tmp_path):
    """The sensor registers files before they are read: one refused at ingest is forgotten, and
    a key whose file was never published can move to another file; a published one cannot."""
    lake = Lake(tmp_path / "lake")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    broken = tmp_path / "a" / "part-7.csv"
    broken.write_text("")
    registry.register(lake, [str(broken)])
    with pytest.raises(LaionAssetsError, match="is empty"):
        stages.run_raw_urls(lake, make_config(), "part-7")
    assert "part-7" not in registry.registered(lake)

    registry.register(lake, [str(broken)])  # e.g. the sensor again: registered, never published
    fixed = tmp_path / "b" / "part-7.parquet"
    GOOD.write_parquet(fixed)
    assert registry.register(lake, [str(fixed)]) == {"part-7": str(fixed)}
    assert registry.registered(lake)["part-7"] == str(fixed)
    stages.run_raw_urls(lake, make_config(), "part-7")
    with pytest.raises(LaionAssetsError, match="already registered"):
        registry.register(lake, [str(broken)])  # the key is published from `fixed` now
    other, clash = tmp_path / "b" / "part-8.csv", tmp_path / "a" / "part-8.parquet"
    with pytest.raises(LaionAssetsError) as two:
        registry.register(lake, [str(other), str(clash)])  # two new files, one key: neither was registered before
    assert str(two.value).startswith(f"two files have the shard key 'part-8': {other} and {clash}; rename one")


def test_a_shard_of_only_integer_urls_fails_the_run_with_the_reason(tmp_path):
    from dagster import instance_for_test

    inputs = tmp_path / "in"
    inputs.mkdir()
    pl.DataFrame({"URL": [1, 2], "TEXT": ["a", "b"]}).write_parquet(inputs / "ints.parquet")
    cfg = write_config(tmp_path / "cfg.yaml", make_config())
    with instance_for_test() as instance:
        summary = run_pipeline([str(inputs)], str(tmp_path / "lake"), str(cfg), "raw_urls,images", instance=instance)
    lines = {line.asset: line for line in summary.lines}
    assert not summary.ok  # the CLI exits 1
    assert lines["raw_urls"].status == "FAILED" and "malformed_url 2 of 2" in lines["raw_urls"].detail
    assert lines["images"].status == "skipped"
    assert not Lake(tmp_path / "lake").exists(stages.IMAGES)


def test_the_sensor_says_what_it_skipped(tmp_path):
    from dagster import SkipReason, build_sensor_context, instance_for_test

    from laion_assets.defs.definitions import build_defs
    from laion_assets.defs.resources import InputsResource, LakeResource, Settings

    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / ".part-0.csv").write_text("URL\nhttps://a.example/1.jpg\n")
    (inputs / "readme.md").write_text("hello")
    lake = str(tmp_path / "lake")
    defs = build_defs(Settings(lake=lake, inputs=str(inputs), config=None))
    sensor = defs.get_sensor_def("shard_files")
    resources = {"inputs": InputsResource(location=str(inputs)), "lake": LakeResource(uri=lake)}
    with instance_for_test() as instance, build_sensor_context(instance=instance, resources=resources) as ctx:
        result = sensor(ctx)
    assert isinstance(result, SkipReason)
    assert "skipped .part-0.csv: hidden file (name starts with '.'); readme.md: not a shard file" in result.skip_message


def test_a_port_in_use_exits_2(tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["demo", "--data", str(tmp_path), "--lake", str(tmp_path / "lake"), "--port", str(port)]) == 2
    assert f"cannot serve the sample on 127.0.0.1:{port}" in capsys.readouterr().err
