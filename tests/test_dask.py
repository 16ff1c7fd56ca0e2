"""A small batch scored on a real Dask cluster gives the same results as the local path, cell for cell."""
import json
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

from her2score.batch import run_batch
from her2score.cli import main
from her2score.synthetic import generate_field, make_slide, write_pyramidal_tiff

distributed = pytest.importorskip("distributed")

COMPARED = ("score", "level", "flags", "counts", "percentages", "tumour_cells", "h_score", "clusters", "qc", "region", "stains")


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Three PNG fields (µm/px in their pHYs), one small pyramidal TIFF and one broken file."""
    d = tmp_path_factory.mktemp("slides")
    for i, score in enumerate(("1+", "2+", "3+")):
        f = generate_field(score, seed=4100 + i, size_px=(384, 384), mpp=0.5)
        Image.fromarray(f.image).save(d / f"field_{i}.png", dpi=(25400 / f.mpp,) * 2)
    rgb, _ = make_slide("2+", seed=4200, size_px=(1600, 1200), mpp=0.25, tissue_fraction=0.5)
    write_pyramidal_tiff(d / "slide.tif", rgb, mpp=0.25, quality=85)
    (d / "broken.tif").write_bytes(b"II*\x00" + b"\x07" * 200)
    return d


@pytest.fixture(scope="module")
def local(slides, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return out, run_batch([slides], out, workers=1)


@pytest.fixture(scope="module")
def cluster():
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
        yield c


def _outputs(out, rows):
    """Per slide: the compared result.json fields and the cell table's rows, or the error."""
    got = {}
    for row in rows:
        if row["status"] != "ok":
            got[row["slide"]] = ("error", row["error"])
            continue
        folder = out / row["output"]
        result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        table = pq.read_table(folder / "cells.parquet")
        cells = [table.column_names] + [[repr(v) for v in r.values()] for r in table.to_pylist()]  # NaN == NaN
        got[row["slide"]] = ({k: result.get(k) for k in COMPARED}, cells)
    return got


def _same(a_out, a_rows, b_out, b_rows):
    a, b = _outputs(a_out, a_rows), _outputs(b_out, b_rows)
    assert sorted(a) == sorted(b)
    for slide in a:
        if a[slide][0] == "error":
            assert b[slide] == a[slide]
            continue
        (res_a, cells_a), (res_b, cells_b) = a[slide], b[slide]
        assert res_b == res_a, slide
        assert len(cells_b) == len(cells_a), f"{slide}: {len(cells_b) - 1} cells on Dask, {len(cells_a) - 1} locally"
        assert cells_b == cells_a, slide


def test_local_batch_is_sound(local):
    out, rows = local
    status = {r["slide"].rsplit("/", 1)[-1]: r["status"] for r in rows}
    assert status == {"field_0.png": "ok", "field_1.png": "ok", "field_2.png": "ok", "slide.tif": "ok", "broken.tif": "error"}
    assert all(int(r["tumour_cells"]) > 0 for r in rows if r["status"] == "ok")
    assert (out / "summary.csv").is_file()


def test_dask_cluster_address_matches_local(slides, local, cluster, tmp_path):
    rows = run_batch([slides], tmp_path, scheduler=cluster.scheduler_address)
    _same(*local, tmp_path, rows)
    assert (tmp_path / "summary.csv").read_text() == (local[0] / "summary.csv").read_text()
    # resumed: scored slides are skipped (only the broken one is tried again), the summary is unchanged
    again = run_batch([slides], tmp_path, scheduler=cluster.scheduler_address)
    assert again == rows


def test_dask_local_cluster_matches_local(slides, local, tmp_path):
    rows = run_batch([slides], tmp_path, scheduler="local", workers=2)
    _same(*local, tmp_path, rows)


def test_dask_worker_in_another_folder_gets_usable_paths(slides, local, tmp_path, monkeypatch):
    """A cluster's workers run in their own working folders: relative slide and output paths given to
    run_batch must reach them made absolute (outputs land in the client's folder, nothing in the worker's)."""
    from dask.distributed import Client, LocalCluster

    (tmp_path / "client" / "in").mkdir(parents=True)
    (tmp_path / "worker").mkdir()
    shutil.copy(slides / "field_1.png", tmp_path / "client" / "in" / "field_1.png")
    monkeypatch.chdir(tmp_path / "client")
    with LocalCluster(n_workers=0, processes=True, dashboard_address=":0") as c:
        worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", c.scheduler_address,
                                   "--nthreads", "1", "--no-dashboard"], cwd=tmp_path / "worker",
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with Client(c) as client:
                client.wait_for_workers(1, timeout=60)
            rows = run_batch(["in"], "out", scheduler=c.scheduler_address)
        finally:
            worker.terminate()
            worker.wait(30)
    assert [r["status"] for r in rows] == ["ok"], rows
    assert (tmp_path / "client" / "out" / rows[0]["output"] / "result.json").is_file()
    assert not [p for p in (tmp_path / "worker").rglob("*") if p.is_file() and p.name in ("result.json", "cells.parquet")]


def test_an_unreachable_scheduler_is_a_clear_error(slides, tmp_path):
    import dask

    from her2score.batch import BatchError

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(BatchError, match=r"cannot reach the Dask scheduler tcp://127\.0\.0\.1:9: "):
            run_batch([slides], tmp_path / "new" / "er" / "out", scheduler="tcp://127.0.0.1:9")
    # no slide was sent: as for any usage error, no folder (it kept an empty batch's files, then the folders above it)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("address", ["bogus", "tcp://host", "host:notaport", "http://localhost:8787", "inproc://", "foo://h:1"])
def test_a_malformed_scheduler_address_is_refused_before_anything_is_written(slides, tmp_path, address):
    from her2score.batch import BatchError

    with pytest.raises(BatchError, match=rf"--scheduler '{address}' is not a Dask scheduler address \(.+\); give e\.g\. tcp://host:8786"):
        run_batch([slides], tmp_path / "out", scheduler=address)
    assert not (tmp_path / "out").exists()
    assert main(["score", str(slides), "--out", str(tmp_path / "cli"), "--scheduler", address, "-q"]) == 2
    assert not (tmp_path / "cli").exists()


def test_a_slide_begun_or_scored_after_the_batch_stopped_writes_nothing(slides, cluster, tmp_path):
    """Ctrl-C on a Dask batch: the client exited and unlocked --out while the workers went on writing outputs. Once the
    batch's stop is set, a slide not yet begun and one scored since write nothing, and leave what was there alone."""
    from dask.distributed import Client, Event

    from her2score.batch import _process_on_cluster, plan_jobs
    from her2score.pipeline import ScoringConfig

    job = plan_jobs([(slides / "field_0.png", slides)], tmp_path, ScoringConfig())[0]
    with Client(cluster.scheduler_address) as client:
        stop = Event("her2score-stop-test", client=client)
        stop.set()
        row = client.submit(_process_on_cluster, job, stop="her2score-stop-test", pure=False).result()
    assert row["status"] == "error" and row["error"] == f"{job.slide}: the batch stopped before it was scored"
    assert not (tmp_path / job.name).exists()
    from her2score.batch import process_slide

    (tmp_path / job.name).mkdir()
    (tmp_path / job.name / "result.json").write_text("{}")  # an earlier run's: not set aside, not removed
    row = process_slide(job, stopped=lambda: True)  # scored, then the stop: nothing written
    assert row["error"] == f"{job.slide}: the batch stopped before its outputs were written"
    assert [p.name for p in (tmp_path / job.name).iterdir()] == ["result.json"]


def test_a_dask_batch_closed_early_tells_its_workers_to_stop(slides, cluster, tmp_path, monkeypatch):
    """Closing the slides' stream (what Ctrl-C or SIGTERM does to the batch) sets the batch's stop Event, which every
    task reads before it writes; the slides not yet begun then end at once."""
    import uuid
    from contextlib import ExitStack

    from dask.distributed import Client, Event

    from her2score.batch import _execute_dask, plan_jobs
    from her2score.pipeline import ScoringConfig

    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=7))
    jobs = plan_jobs([(p, slides) for p in sorted(slides.glob("field_*.png"))], tmp_path, ScoringConfig())
    with ExitStack() as stack:
        stream = _execute_dask(jobs, 1, cluster.scheduler_address, stack)
        next(stream)
        stream.close()
        with Client(cluster.scheduler_address) as client:
            assert Event(f"her2score-stop-{uuid.UUID(int=7).hex}", client=client).is_set()
