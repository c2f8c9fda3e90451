"""The Dagster UI in a real browser: Debian's chromium driven by Playwright against a
dagster-webserver and a dagster-daemon on 127.0.0.1 (a tmp instance, the sample images served
by test servers), with every sensor on, as a user finds them. A user opens the lineage,
re-executes a run the CLI started (the dead-run sensor must leave it alone), materializes one
shard, backfills two more (one of them fails its images gate), then reads the per-shard check
results and looks at the thumbnails (a Cyrillic caption drawn in a real font) and histograms.

Set LAION_ASSETS_SCREENSHOTS=<folder> to keep the screenshots of each step."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from dagster import AssetCheckKey, AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus
from PIL import Image

from laion_assets.cli.pipeline import run_pipeline
from laion_assets.core.ingest.sample import sample_rows
from laion_assets.core.ui import pictures
from laion_assets.defs.recovery import recover_dead_runs
from laion_assets_tests.conftest import REPO, make_config, write_config
from laion_assets_tests.faultsite import FaultServer

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
STAGES = [  # node labels: the last part of each asset key, one per node
    "raw_urls", "images", "language", "embeddings_tiny", "scores", "similar", "pretty", "lake_summary",
    "dedup_keys", "duplicates", "blocked",
]
CAPTION = "Кошка спит на тёплой крыше"  # shard-a's captions: Cyrillic, which PIL's default font draws as boxes
SLOW_MS = 2500  # a few of shard-a's images answer this late, so its images step lasts seconds
DONE = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
INSTANCE_YAML = """
storage:
  sqlite:
    base_dir: {home}/storage
local_artifact_storage:
  module: dagster._core.storage.root
  class: LocalArtifactStorage
  config:
    base_dir: {home}
compute_logs:
  module: dagster._core.storage.local_compute_log_manager
  class: LocalComputeLogManager
  config:
    base_dir: {home}/logs
telemetry:
  enabled: false
nux:
  enabled: false
concurrency:
  pools:
    default_limit: 1
  runs:
    max_concurrent_runs: 2
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(base: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(f"{base}/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)["data"]


def wait_until_serving(base: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"dagster-webserver exited:\n{log.read_text()[-3000:]}"
        try:
            urllib.request.urlopen(f"{base}/server_info", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"dagster-webserver did not start in {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ui(tmp_path_factory, site, server):
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: run scripts/system-packages.sh"
    root = tmp_path_factory.mktemp("ui")
    slow = FaultServer(site[0])  # the sample's images again, answered late on its /sleep/ route
    rows = sample_rows(site[1], server.base_url)
    images = rows.filter(pl.col("URL").str.contains("/img/"))
    faults = rows.filter(~pl.col("URL").fill_null("").str.contains("/img/"))
    late = images.slice(24, 3).with_columns(pl.col("URL").str.replace(r"^.*/img/", f"{slow.base_url}/sleep/{SLOW_MS}/ui/"))
    shards = root / "shards"
    shards.mkdir()
    pl.concat([images.slice(0, 12), late]).with_columns(TEXT=pl.lit(CAPTION)).vstack(faults).write_parquet(shards / "shard-a.parquet")
    pl.concat([images.slice(12, 12), faults]).write_parquet(shards / "shard-b.parquet")
    rows.filter(pl.col("URL").fill_null("").str.contains("/missing/")).write_parquet(shards / "shard-c.parquet")  # fails its gate
    config = write_config(root / "config.yaml", make_config())
    home = root / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(INSTANCE_YAML.format(home=home))
    (root / "input").mkdir()  # the sensor's folder stays empty: the shards are registered below
    lake = str(root / "lake")
    instance = DagsterInstance.from_config(str(home))
    # the CLI registers the three shards and materializes their raw_urls and images
    summary = run_pipeline([str(shards)], lake, str(config), "raw_urls,images", instance=instance)
    status = {(line.shard, line.asset): line.status for line in summary.lines}
    assert status == {(s, a): "FAILED" if (s, a) == ("shard-c", "images") else "materialized"
                      for s in ("shard-a", "shard-b", "shard-c") for a in ("raw_urls", "images")}, summary.lines
    cli_runs = {r.dagster_run.tags["dagster/partition"]: r.dagster_run.run_id for r in instance.get_run_records()}

    env = {
        **os.environ, "DAGSTER_HOME": str(home), "LAION_ASSETS_LAKE": lake, "LAION_ASSETS_CONFIG": str(config),
        "LAION_ASSETS_INPUT": str(root / "input"), "AWS_EC2_METADATA_DISABLED": "true",
    }
    bin_dir = Path(sys.executable).parent
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs = []
    webserver_log = root / "webserver.log"
    procs.append(subprocess.Popen(
        [bin_dir / "dagster-webserver", "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
        cwd=REPO, env=env, stdout=webserver_log.open("w"), stderr=subprocess.STDOUT,
    ))
    try:
        wait_until_serving(base, procs[0], webserver_log)
        procs.append(subprocess.Popen(  # sensors (on by default), backfills and queued runs
            [bin_dir / "dagster-daemon", "run", "-w", "workspace.yaml"],
            cwd=REPO, env=env, stdout=(root / "daemon.log").open("w"), stderr=subprocess.STDOUT,
        ))
        shots = Path(os.environ.get("LAION_ASSETS_SCREENSHOTS") or root / "screenshots")
        shots.mkdir(parents=True, exist_ok=True)
        yield SimpleNamespace(base=base, instance=instance, cli_runs=cli_runs, shots=shots, root=root)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        instance.dispose()
        slow.close()


def launch(page, base: str, shards: list[str], button: str) -> None:
    """Materialize every stage of `shards` from the shard_pipeline job's page."""
    from playwright.sync_api import expect

    page.goto(f"{base}/locations/laion_assets/jobs/shard_pipeline")
    page.get_by_role("button", name="Materialize all").click()
    dialog = page.locator(".dagster-dialog")
    # before the first lake-wide pass, Dagster warns that the curation tables the subsets read
    # are not there yet; the subset stage runs without them (nothing marked duplicate or blocked)
    pick = dialog.get_by_text("Select a partition or create one")
    expect(pick.or_(dialog.get_by_text("Are you sure?"))).to_be_visible()
    if not pick.is_visible():
        expect(dialog).to_contain_text("curation / duplicates")
        dialog.get_by_role("button", name="Confirm").click()
    pick_partitions(page, dialog, shards)
    dialog.get_by_role("button", name=button).click()
    dialog.wait_for(state="detached")


def pick_partitions(page, dialog, shards: list[str]) -> None:
    """Tick `shards` in the dialog's partition list. The dialog may reset its selection (and
    close the list) when the partitions' status arrives after it opened, so the ticks are
    checked against the dialog's partition count and made again until they hold."""
    from playwright.sync_api import TimeoutError, expect

    picker = dialog.locator('[aria-haspopup="dialog"]')  # the selected tags and the list's toggle
    counted = dialog.get_by_text(f"{len(shards)} partition{'s' if len(shards) > 1 else ''}", exact=True)
    for _ in range(5):
        try:
            for shard in shards:
                if picker.get_by_title(shard, exact=True).count():
                    continue
                if picker.get_attribute("aria-expanded") != "true":
                    picker.click()
                page.locator(".dagster-popover span", has_text=shard).first.click(timeout=5_000)
            if picker.get_attribute("aria-expanded") == "true":
                page.keyboard.press("Escape")  # closes the partition list, not the dialog
            expect(counted).to_be_visible(timeout=5_000)
            if all(picker.get_by_title(shard, exact=True).count() for shard in shards):
                return
        except (TimeoutError, AssertionError):
            pass
    raise AssertionError(f"the launch dialog did not keep the partitions {shards}")


def wait_until_quiet(instance: DagsterInstance, at_least: int, quiet_s: float = 75, timeout: float = 900) -> list:
    """The runs, once at least `at_least` exist, all finished, and no new one came for `quiet_s`
    (the automation sensor ticks every 30 s and may start more)."""
    deadline, seen, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        runs = [r.dagster_run for r in instance.get_run_records()]
        if len(runs) != seen or not all(r.status in DONE for r in runs):
            seen, since = len(runs), time.monotonic()
        elif len(runs) >= at_least and time.monotonic() - since > quiet_s:
            return runs
        time.sleep(2)
    raise AssertionError(f"runs still coming after {timeout}s: {[(r.run_id[:8], r.status) for r in runs]}")


def watch_reexecution(instance: DagsterInstance, run_id: str, timeout: float = 600) -> int:
    """While the re-executed run goes, check as the dead_runs sensor does: it must never judge
    the run by the pid tags it copied from the CLI's (long gone) run, and the run's download
    slot must stay claimed while its images step runs. Returns how often the slot was checked."""
    deadline, checked = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        if run.is_finished:
            return checked
        steps = {e.step_key: e.dagster_event.event_type for e in instance.all_logs(run_id) if e.dagster_event and e.step_key}
        notes = recover_dead_runs(instance)
        assert not [n for n in notes if run_id[:8] in n], notes
        if steps.get("images") == DagsterEventType.STEP_START:
            held = instance.event_log_storage.get_concurrency_run_ids()
            if instance.get_run_by_id(run_id).status == DagsterRunStatus.STARTED:
                assert run_id in held, "the running images step's download slot was freed"
                checked += 1
        time.sleep(0.3)
    raise AssertionError(f"re-executed run {run_id} still going after {timeout}s")


def caption_drawn_in_a_real_font(grid: Image.Image, caption: str, tile: int = 0) -> float:
    """Mean grey difference between tile `tile`'s caption in the grid and the caption drawn
    by the same code in DejaVu Sans: ~2 for the same font, 20-65 for PIL's default boxes."""
    lines = pictures.caption_lines(caption, 112)
    x, y = pictures.tile_origin(tile)
    top = y + 112 + 2
    drawn = grid.crop((x, top, x + 112, top + pictures.LINE_H * len(lines))).convert("L")
    expected = pictures.text_image(lines, 112).convert("L")
    return float(np.abs(np.asarray(drawn, float) - np.asarray(expected, float)).mean())


def show_picture(page, label: str) -> Image.Image:
    """Open a picture metadata entry ([Show Markdown]) and return its image, decoded from the
    data URI the page shows."""
    row = page.locator("tr").filter(has=page.get_by_text(label, exact=True)).filter(has=page.get_by_text("[Show Markdown]"))
    row.get_by_text("[Show Markdown]").click()
    image = page.locator(".dagster-dialog img").first
    image.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    return Image.open(io.BytesIO(base64.b64decode(image.get_attribute("src").split(",", 1)[1]))).convert("RGB")


def test_ui_runs_shards_and_shows_checks_and_pictures(ui):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)  # the first page waits for the code location to load
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.set_default_timeout(60_000)

        def shot(name: str) -> None:
            page.screenshot(path=str(ui.shots / f"{name}.png"))

        # the lineage opens with the chain visible: one node per asset, each label once
        page.goto(f"{ui.base}/asset-groups")
        nodes = page.locator("svg foreignObject")
        expect(nodes).to_have_count(len(STAGES))
        labels = [t.strip() for t in nodes.all_text_contents()]
        assert sorted(labels) == sorted(STAGES) and len(set(labels)) == len(labels)
        shot("01-lineage")

        # a run the CLI started is re-executed from the UI, with the dead_runs sensor on: the
        # re-execution carries the CLI run's pid tags, yet is never marked failed, and its
        # download slot stays held while its images step runs
        cli_run = ui.cli_runs["shard-a"]
        page.goto(f"{ui.base}/runs/{cli_run}")
        page.get_by_role("button", name=re.compile(r"Re-execute all")).click()
        page.wait_for_url(re.compile(r"/runs/(?!" + cli_run + r")[0-9a-f-]{36}"))
        again_id = page.url.rsplit("/", 1)[1]
        assert watch_reexecution(ui.instance, again_id) >= 1, "the images step was never seen holding its slot"
        again = ui.instance.get_run_by_id(again_id)
        assert again.status == DagsterRunStatus.SUCCESS and again.parent_run_id == cli_run and again.job_name == "shard_pipeline"
        assert again.tags["laion_assets/pid"] == ui.instance.get_run_by_id(cli_run).tags["laion_assets/pid"]  # copied
        assert not [e for e in ui.instance.all_logs(again_id) if e.dagster_event and e.dagster_event.event_type == DagsterEventType.RUN_FAILURE]

        launch(page, ui.base, ["shard-a"], "Launch 1 run")  # one shard
        launch(page, ui.base, ["shard-b", "shard-c"], "Launch backfill")  # a backfill of two
        runs = wait_until_quiet(ui.instance, at_least=3 + 1 + 1 + 2)  # CLI, re-execution, UI runs (+ automation's)
        by_shard = {}
        for run in runs:
            if run.run_id not in ui.cli_runs.values():
                by_shard.setdefault(run.tags.get("dagster/partition"), []).append(run)
        assert {r.status for r in by_shard["shard-a"] + by_shard["shard-b"]} == {DagsterRunStatus.SUCCESS}
        assert {r.status for r in by_shard["shard-c"]} == {DagsterRunStatus.FAILURE}  # each of them ran images
        logged = [e.message for r in runs for e in ui.instance.all_logs(r.run_id)]
        assert not [m for m in logged if "not selected" in m]  # each stage records its own gate, quietly

        # one check result per shard: two passed, shard-c failed with its reason
        page.goto(f"{ui.base}/assets/images?view=checks")
        check_tabs = page.get_by_role("tablist").nth(1)  # the check's own tabs, under the asset's
        check_tabs.get_by_role("tab", name="Partitions").click()
        expect(page.get_by_text("Failed (1)", exact=True)).to_be_visible()
        expect(page.get_by_text("Passed (2)", exact=True)).to_be_visible()
        shot("02-check-partitions")
        check_tabs.get_by_role("tab", name="Execution history").click()
        failed = page.locator("tr", has=page.get_by_text("shard-c", exact=True)).first
        expect(failed).to_contain_text("Failed")
        expect(failed).to_contain_text("shard shard-c not published")
        expect(failed).to_contain_text("for at least 50% of rows")
        for shard in ("shard-a", "shard-b"):
            expect(page.locator("tr", has=page.get_by_text(shard, exact=True)).first).to_contain_text("Passed")
        shot("03-check-history")

        # the stages after images never ran for shard-c: their gates say nothing of it (no
        # "Execution failed" row, no failed partition)
        page.goto(f"{ui.base}/assets/scores?view=checks")
        check_tabs = page.get_by_role("tablist").nth(1)
        check_tabs.get_by_role("tab", name="Execution history").click()
        expect(page.locator("tr", has=page.get_by_text("shard-a", exact=True)).first).to_contain_text("Passed")
        expect(page.get_by_text("Execution failed")).to_have_count(0)
        check_tabs.get_by_role("tab", name="Partitions").click()
        expect(page.get_by_text("Passed (2)", exact=True)).to_be_visible()
        shot("04-later-gate")
        expect(page.get_by_text(re.compile(r"^(Execution failed|Failed) \([1-9]\d*\)$"))).to_have_count(0)
        for stage in ("scores", "embeddings_tiny", "subsets/similar"):
            records = ui.instance.event_log_storage.get_asset_check_execution_history(AssetCheckKey(AssetKey(stage.split("/")), "quality_gate"), limit=50)
            assert not [r for r in records if r.partition in ("shard-c", None)], stage

        # thumbnails and histograms render from the event log (no source server needed); the
        # Cyrillic captions are letters, not boxes
        for asset, label in [
            ("images", "thumbnails"), ("images", "image_sizes"), ("embeddings_tiny", "similarity_histogram"),
            ("scores", "score_histograms"), ("scores", "thumbnails"), ("subsets/pretty", "kept_histograms"),
        ]:
            page.goto(f"{ui.base}/assets/{asset}?view=partitions&partition=shard-a")
            picture = show_picture(page, label)
            assert picture.width > 100, (asset, label)
            if (asset, label) == ("images", "thumbnails"):
                assert caption_drawn_in_a_real_font(picture, CAPTION) < 10
            shot(f"05-{asset.replace('/', '-')}-{label}")
            page.get_by_role("button", name="Close").click()
        browser.close()
