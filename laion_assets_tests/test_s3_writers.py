"""Delta on S3 with many writers. deltalake 1.x commits to S3 with a conditional write
(`If-None-Match: *` on `_delta_log/<version>.json`) instead of a DynamoDB lock: the store must
refuse a second create of one key. The moto server used here does (checked first), and eleven
writer processes then publish shards and append staging chunks to one table at once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import boto3
import polars as pl
import pytest
from botocore.exceptions import ClientError
from deltalake import DeltaTable

from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.lake.store import check_conditional_writes

WRITER = r"""
import json, sys, time
import polars as pl, pyarrow as pa
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.lake.delta import Lake

writer, shard, start = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
lake = Lake("s3://laion/lake")
n = 20000 if shard == "s0" else 20  # s0 is big enough for its three writers to overlap
rows = pl.DataFrame({"uid": [int(shard[1:]) * 1_000_000 + j for j in range(n)], "caption": [f"row {j}" for j in range(n)]})
while time.time() < start:  # every writer commits at the same moment
    time.sleep(0.001)
if writer < 10 and shard != "s0":  # staging appends first (the two writers of s0 go straight to publish)
    for chunk in range(3):
        lake.append("_staging/t", rows.slice(chunk * 5, 5).with_columns(chunk=pl.lit(chunk), writer=pl.lit(writer)), shard=shard)
meta = {"writer": writer}
if writer % 2:
    lake.publish_shard("t", shard, rows, metadata=meta)
else:
    table = rows.to_arrow()
    lake.publish_stream("t", shard, pa.RecordBatchReader.from_batches(table.schema, table.to_batches()), metadata=meta)
print(json.dumps({"writer": writer, "retries": lake.commit_retries}))
"""


def test_the_test_s3_server_refuses_a_second_create_and_deltalake_asks_for_it(moto_s3):
    client = boto3.client("s3", endpoint_url=moto_s3.endpoint)
    client.put_object(Bucket="laion", Key="probe", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client.put_object(Bucket="laion", Key="probe", Body=b"second", IfNoneMatch="*")
    assert client.get_object(Bucket="laion", Key="probe")["Body"].read() == b"first"

    lake = Lake("s3://laion/lake")
    lake.append("t", pl.DataFrame({"uid": [1]}), shard="a")
    lake.append("t", pl.DataFrame({"uid": [2]}), shard="b")
    assert [(c["key"].rsplit("/", 1)[1], c["if_none_match"], c["status"]) for c in moto_s3.commits()] == [
        ("00000000000000000000.json", "*", "200"), ("00000000000000000001.json", "*", "200"),
    ]


def test_check_store_accepts_a_store_that_refuses_second_creates_and_refuses_one_that_does_not(moto_s3, capsys):
    from laion_assets.cli import main
    from laion_assets_tests.servers import MotoServer

    assert main(["check-store", "--lake", "s3://laion/lake"]) == 0
    assert "concurrent writers are safe" in capsys.readouterr().out
    careless = MotoServer(honour_conditional_writes=False).start()
    try:
        client = boto3.client("s3", endpoint_url=careless.endpoint)
        client.create_bucket(Bucket="laion")
        with pytest.raises(LaionAssetsError, match="ignores If-None-Match"):
            check_conditional_writes(Lake("s3://laion/lake", {"AWS_ENDPOINT_URL": careless.endpoint}))
        assert client.list_objects_v2(Bucket="laion").get("KeyCount") == 0  # the probe cleans up
    finally:
        careless.stop()


@pytest.mark.slow
def test_eleven_writers_publish_and_stage_into_one_table_at_once(moto_s3):
    """8 writers publish one shard each (7 after 3 staging appends); 3 more replace shard s0 at
    the same moment as its own writer (one shard run four times at once, e.g. retries racing a
    straggler). Every commit lands, none overwrites another, conflicts are retried."""
    shards = [f"s{i}" for i in range(8)] + ["s0"] * 3
    Lake("s3://laion/lake").publish_shard("t", "s0", pl.DataFrame({"uid": [-1], "caption": ["old s0"]}))
    start = time.time() + 6  # after every writer has imported
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(w), shard, str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w, shard in enumerate(shards)
    ]
    results = [w.communicate(timeout=180) for w in writers]
    assert [w.returncode for w in writers] == [0] * len(shards), [err[-2000:] for _, err in results]
    retries = sum(json.loads(out.strip().splitlines()[-1])["retries"] for out, _ in results)

    table = pl.read_delta("s3://laion/lake/t")
    assert dict(table.group_by("shard").len().iter_rows()) == {"s0": 20000} | {f"s{i}": 20 for i in range(1, 8)}
    assert table["uid"].is_unique().all()  # s0, written three times, holds its rows once
    staged = pl.read_delta("s3://laion/lake/_staging/t")
    assert staged.height == 7 * 3 * 5 and staged.select("writer", "chunk", "uid").is_unique().all()

    # The log: one commit per write, versions 0..n-1, each written once (the store refused
    # every second create), and every publish's commit present.
    history = DeltaTable("s3://laion/lake/t").history()
    assert sorted(int(h["writer"]) for h in history if "writer" in h) == list(range(len(shards)))
    puts = moto_s3.commits()
    landed = [c["key"] for c in puts if c["status"] == "200"]
    assert len(landed) == len(set(landed)) == 1 + len(shards) + 7 * 3
    refused = Counter(c["status"] for c in puts)["412"]
    assert refused > 0  # writers really collided: the store refused their creates
    assert retries > 0  # and the lake's own retry ran on real conflicts (same shard twice)
    print(f"\n{len(landed)} commits landed, {refused} creates refused by the store (rebased by deltalake), "
          f"{retries} conflicting commits retried by the lake")
