"""Is the lake's object store safe for concurrent writers? (`laion-assets check-store`) Are
there credentials for it at all?"""

from __future__ import annotations

from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError


def check_conditional_writes(lake: Lake) -> str:
    """Make sure the object store refuses a second create of one key (`If-None-Match: *`):
    deltalake 1.x commits every table version that way, so on a store that ignores it two
    writers of one version overwrite each other's commit. Local folders use an atomic
    rename; gs:// and az:// have native preconditions."""
    if not lake.uri.startswith("s3://"):
        return f"{lake.uri}: commits are atomic without a probe"
    import uuid

    import boto3
    from botocore.exceptions import ClientError

    options = {k.upper(): v for k, v in (lake.storage_options or {}).items()}
    client = boto3.client("s3", endpoint_url=options.get("AWS_ENDPOINT_URL"), region_name=options.get("AWS_REGION"))
    bucket, _, prefix = lake.uri.removeprefix("s3://").partition("/")
    key = f"{prefix}/_laion_assets_probe/{uuid.uuid4().hex}".lstrip("/")
    client.put_object(Bucket=bucket, Key=key, Body=b"first", IfNoneMatch="*")
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"second", IfNoneMatch="*")
        refused = False
    except ClientError as e:
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") not in (409, 412):
            raise
        refused = True
    finally:
        client.delete_object(Bucket=bucket, Key=key)
    if not refused:
        raise LaionAssetsError(
            f"the store of {lake.uri} ignores If-None-Match (it overwrote a key created with it): "
            "concurrent writers would overwrite each other's Delta commits; use a store that honours "
            "conditional writes or keep one writer per table (max_concurrent_runs: 1)"
        )
    return f"{lake.uri}: the store refuses a second create of one key; concurrent writers are safe"


def require_credentials(uri: str) -> None:
    """Refuse an s3:// location (lake or input) when no AWS credentials can be found, saying
    what to set: without this, pyarrow fails with a traceback and deltalake with a dump of its
    credential chain. boto3 looks where both do (environment, AWS_PROFILE and ~/.aws, web
    identity, container; an instance role only when AWS_EC2_METADATA_DISABLED=false)."""
    if not uri.startswith("s3://"):
        return
    import boto3

    if boto3.Session().get_credentials() is None:
        raise LaionAssetsError(
            f"{uri}: no AWS credentials found: export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE "
            "naming a profile in ~/.aws/credentials); on a machine with an instance role, set AWS_EC2_METADATA_DISABLED=false"
        )
