"""Hosting the app for strangers, against a real `python app.py` on loopback: uploads belong to their owner,
jobs leave no files behind, a hostile request neither stalls other clients nor runs past the time limit,
and 16 concurrent clients get every answer.
"""

from __future__ import annotations

import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import gradio as gr
import pytest
from app_server import TEST_SIZE, running_server
from factories import scene_image, shape_bomb_checkpoints, tiny_checkpoint
from labelme_fixtures import costly_labelme, costly_request, generate_folder
from PIL import Image
from video_files import make_video

from gradio_client import Client, handle_file

TIME_LIMIT = 20
UNPACKED_BYTES = 4_000_000  # the server's per-request zip budget in these tests


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hosting")
    with running_server(root / "server", tiny_checkpoint(root / "tiny.pth"), SEGCORE_TIME_LIMIT=TIME_LIMIT,
                        SEGCORE_MAX_VIDEO_SECONDS=60, SEGCORE_MAX_UNPACKED_BYTES=UNPACKED_BYTES) as (url, proc):
        yield url, root / "server", proc


def client(server) -> Client:
    """A new visitor: its own session and its own download folder (patient: the test machine is shared)."""
    return Client(server[0], verbose=False, httpx_kwargs={"timeout": 300},
                  download_files=tempfile.mkdtemp(prefix="client-", dir=server[1]))


def png(path: Path, h=40, w=48, seed=0) -> Path:
    Image.fromarray(scene_image(h, w, seed=seed)).save(path)
    return path


def segment(c: Client, image: Path, weights="tiny.pth"):
    return c.predict(handle_file(str(image)), weights, False, False, TEST_SIZE, 0.5, api_name="/segment_image")


# ----------------------------------------------------------------------------- uploads


def test_same_name_uploads_belong_to_their_owner(server, tmp_path):
    alice, bob = client(server), client(server)
    a = tiny_checkpoint(tmp_path / "a" / "final.pth", seed=1, meta={"class_names": [f"alice{i}" for i in range(21)]})
    b = tiny_checkpoint(tmp_path / "b" / "final.pth", seed=2, meta={"class_names": [f"bob{i}" for i in range(21)]})
    a_name, _ = alice.predict(handle_file(str(a)), "auto", None, api_name="/upload_checkpoint")
    b_name, _ = bob.predict(handle_file(str(b)), "auto", None, api_name="/upload_checkpoint")
    assert a_name != b_name and a_name.startswith("final.pth") and b_name.startswith("final.pth")

    image = png(tmp_path / "x.png")
    assert ">alice" in segment(alice, image, a_name)[2]  # each runs their own model
    assert ">bob" in segment(bob, image, b_name)[2]
    with pytest.raises(Exception, match="unknown weights") as refused:
        segment(bob, image, a_name)  # a name Bob did not upload is not selectable by passing it
    choices = str(refused.value).split("choose one of", 1)[1]
    assert b_name in choices and a_name not in choices  # the choices listed are Bob's own plus public names
    assert ">alice" in segment(alice, image, a_name)[2]  # Bob's upload replaced nothing


def test_refused_checkpoint_is_deleted_at_once(server, tmp_path):
    _, root, _ = server
    before = files_under(root / "app" / "checkpoints")
    bad = tmp_path / "final.pth"
    bad.write_bytes(b"PK\x03\x04 not a checkpoint at all" * 50)
    with pytest.raises(Exception, match="final.pth"):
        client(server).predict(handle_file(str(bad)), "auto", None, api_name="/upload_checkpoint")
    assert files_under(root / "app" / "checkpoints") == before
    kept_by_gradio = [p for p in (root / "gradio").rglob("final.pth") if p.read_bytes() == bad.read_bytes()]
    assert kept_by_gradio == []


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("kind,match", [("stride0", "backed by only 4 bytes"), ("zero", "zero-size shape"),
                                        ("wide", "describes a model of"), ("block20000", "index 20000")])
def test_shape_bomb_checkpoints_are_refused_without_building_them(server, tmp_path, kind, match):
    """A few KB describing an enormous model: refused by its shapes, deleted, and the server's memory does not
    jump (building it took 1.3-3 GB before the checks)."""
    _, root, proc = server
    bomb = shape_bomb_checkpoints(tmp_path)[kind]
    before_files, before_rss = files_under(root / "app" / "checkpoints"), _rss_mib(proc.pid)
    with pytest.raises(Exception, match=match):
        client(server).predict(handle_file(str(bomb)), "auto", None, api_name="/upload_checkpoint")
    assert files_under(root / "app" / "checkpoints") == before_files
    assert _rss_mib(proc.pid) - before_rss < 200


def test_shared_uploads_option(tmp_path):
    with running_server(tmp_path / "server", tiny_checkpoint(tmp_path / "tiny.pth"), "--shared-uploads") as (url, _):
        alice, bob = client((url, tmp_path)), client((url, tmp_path))
        ckpt = tiny_checkpoint(tmp_path / "final.pth", seed=3, meta={"class_names": [f"k{i}" for i in range(21)]})
        name, _ = alice.predict(handle_file(str(ckpt)), "auto", None, api_name="/upload_checkpoint")
        assert ">k" in segment(bob, png(tmp_path / "x.png"), name)[2]


# ----------------------------------------------------------------------------- disk


def test_jobs_leave_only_their_results(server, tmp_path):
    _, root, _ = server
    jobs = root / "app" / "jobs"
    c = client(server)
    before = files_under(jobs)

    folder = tmp_path / "labelme"
    generate_folder(folder, 3, seed=1, size=(48, 40), n_shapes=4)
    files = [handle_file(str(p)) for p in sorted(folder.iterdir())]
    dataset, _, _ = c.predict(files, "voc", "error", None, None, False, api_name="/convert")
    added = files_under(jobs) - before
    assert [Path(p).name for p in added] == ["dataset.zip"] == [Path(dataset).name]  # the extraction is gone

    before = files_under(jobs)
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(Exception, match="broken.json"):
        c.predict([handle_file(str(broken))], "voc", "error", None, None, False, api_name="/convert")
    corrupt = tmp_path / "truth.zip"
    corrupt.write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    with pytest.raises(Exception, match="truth.zip|zip"):
        c.predict("Prediction masks vs ground truth (no model)", [handle_file(str(corrupt))],
                  [handle_file(str(png(tmp_path / "pred.png")))], None, "voc", None, "error", "tiny.pth", False,
                  False, TEST_SIZE, api_name="/evaluate")
    # nothing added (earlier tests' results may expire meanwhile: they are kept a minute for the download)
    assert files_under(jobs) - before == set()  # failed jobs: nothing left

    clip = make_video(tmp_path / "clip.mp4", frames=240, size=(160, 120), fps=30, codec="mpeg4")
    job = c.submit(handle_file(str(clip)), "tiny.pth", False, False, TEST_SIZE, 0.5, 1, 0.0,
                   api_name="/segment_video")
    deadline = time.monotonic() + 120
    while not (job.status().progress_data or job.done()) and time.monotonic() < deadline:
        time.sleep(0.05)  # polls for the job's own progress report, not a fixed wait
    assert not job.done(), "the video finished before it could be cancelled"
    c.predict(api_name="/cancel_video")
    video, info = job.result(timeout=120)
    assert video is None and info.startswith("Cancelled")
    assert files_under(jobs) - before == set()  # the cancelled job's half-written video is gone


def _video_seconds(path: Path) -> float:
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        return max(float((p.pts + (p.duration or 0)) * p.time_base) for p in c.demux(stream) if p.pts is not None)


def test_long_audio_track_is_cut_to_the_video(server, tmp_path):
    from segcore.video import AUDIO_TAIL_SECONDS
    from video_files import audio_seconds, clip_with_long_audio

    _, root, _ = server
    jobs, before = root / "app" / "jobs", files_under(root / "app" / "jobs")
    src = clip_with_long_audio(tmp_path / "long_audio.mp4", frames=3, fps=10, audio_seconds=60.0)
    assert audio_seconds(src) > 59 and _video_seconds(src) < 0.5  # a 0.3 s clip with a minute of sound
    out, info = client(server).predict(handle_file(str(src)), "tiny.pth", False, False, TEST_SIZE, 0.5, 1, 0.0,
                                       api_name="/segment_video")
    path = Path(out["video"] if isinstance(out, dict) else out)
    assert "3 frames" in info and "audio kept" in info
    one_packet = 1024 / 8000  # an AAC frame of the 8 kHz track
    assert 0 < audio_seconds(path) <= _video_seconds(path) + AUDIO_TAIL_SECONDS + one_packet
    added = files_under(jobs) - before  # the job left its result only (kept a minute for the download)
    assert len(added) == 1 and Path(added.pop()).suffix == ".mp4"


def test_each_request_writes_its_own_result_files(server, tmp_path):
    _, root, _ = server
    jobs = root / "app" / "jobs"
    image = png(tmp_path / "same.png")
    before = {p.name for p in jobs.glob("image-*")}
    results = []
    threads = [threading.Thread(target=lambda: results.append(segment(client(server), image))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2
    new = sorted(p for p in jobs.glob("image-*") if p.name not in before)
    assert len(new) == 2  # same input, two requests: two folders, nothing shared or rewritten
    for folder in new:
        assert sorted(p.name for p in folder.iterdir()) == ["label_map.png", "overlay.png", "same.json", "same_mask.png"]


# ----------------------------------------------------------------------------- CPU and time


def test_other_clients_are_answered_while_a_hostile_request_runs(server, tmp_path):
    url, root, _ = server
    jobs, before = root / "app" / "jobs", files_under(root / "app" / "jobs")
    upload = [handle_file(str(p)) for p in costly_request(tmp_path)]
    attacker, visitor = client(server), client(server)
    evaluation = attacker.submit("Model on labelme annotations", upload, None, None, "voc", None,
                                 "error", "tiny.pth", False, False, TEST_SIZE, api_name="/evaluate")
    conversion = attacker.submit(upload, "voc", "error", None, None, False, api_name="/convert")
    deadline = time.monotonic() + 60
    while not all(j.done() or j.status().code.name in ("PROCESSING", "PROGRESS") for j in (evaluation, conversion)):
        assert time.monotonic() < deadline, "the hostile requests never started"
        time.sleep(0.05)

    image = png(tmp_path / "x.png")
    for _ in range(3):
        start = time.monotonic()
        assert Path(segment(visitor, image)[3]).is_file()
        with urllib.request.urlopen(url + "config", timeout=30) as r:
            assert r.status == 200
        assert time.monotonic() - start < 10

    for job in (evaluation, conversion):  # both stopped at the time limit, with its message
        with pytest.raises(Exception, match=f"time limit of {TIME_LIMIT} s"):
            job.result(timeout=120)
    left = {f for f in files_under(jobs) - before if not f.startswith("image-")}  # the visitor's results aside
    assert left == set()  # nothing of the hostile jobs is left


def test_shapes_too_costly_to_draw_are_refused_per_file(server, tmp_path):
    c = client(server)
    ok = costly_labelme(tmp_path / "fine.json", side=400, crossings_per_row=100)
    over = costly_labelme(tmp_path / "costly.json", side=400, crossings_per_row=3000)
    dataset, text, _ = c.predict([handle_file(str(ok)), handle_file(str(over))], "voc", "error", None, None, False,
                                 api_name="/convert")
    assert Path(dataset).is_file()
    assert "costly.json" in text and "drawing them would take too long" in text


def test_busy_and_time_limit_messages(tmp_path):
    """The job wrapper on its own: over the temp cap a job does not start; past the limit it stops."""
    from demo.jobs import BUSY, JobDirs, Jobs, TempSpace

    work = JobDirs(tmp_path / "app")
    (tmp_path / "app" / "big.bin").write_bytes(b"x" * 5000)
    ran = []

    def job(progress=None):
        ran.append(work.new("x"))
        for i in range(100):
            progress(i / 100)
            time.sleep(0.01)

    with pytest.raises(gr.Error, match=BUSY.split(":")[0]):
        Jobs(work, TempSpace([tmp_path / "app"], 4000), None).scoped(job)(lambda *_: None)
    assert ran == []
    with pytest.raises(gr.Error, match="time limit of 0.2 s"):
        Jobs(work, TempSpace([tmp_path / "app"], 10_000), 0.2).scoped(job)(lambda *_: None)
    assert len(ran) == 1 and not ran[0].exists()  # the stopped job's folder is gone


def test_heap_is_trimmed_at_most_every_few_seconds():
    from demo.memory import HeapTrimmer

    trim = HeapTrimmer(every=3600)
    if trim._libc is None:
        pytest.skip("not glibc")
    assert trim() is True and trim() is False  # one trim, then none until the hour is over
    assert HeapTrimmer(every=0)() is True


# ----------------------------------------------------------------------------- load


def test_sixteen_clients_eight_requests_each_without_a_failure(server, tmp_path):
    image = png(tmp_path / "load.png", 36, 48, seed=5)
    failures, done = [], []

    def visitor():
        c = client(server)
        for _ in range(8):
            try:
                out = segment(c, image)
                assert all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in (out[0], out[1], out[3]))
                done.append(1)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                failures.append(repr(exc))

    threads = [threading.Thread(target=visitor) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert failures == [] and len(done) == 128


def test_an_owners_oldest_upload_goes_past_the_quota(tmp_path):
    from demo.models import MAX_UPLOADS_PER_OWNER, ModelStore

    store = ModelStore(str(tiny_checkpoint(tmp_path / "base.pth")), upload_dir=tmp_path / "uploads")
    names = []
    for i in range(MAX_UPLOADS_PER_OWNER + 2):
        (tmp_path / str(i)).mkdir()
        names.append(store.upload(tiny_checkpoint(tmp_path / str(i) / "final.pth", seed=i), owner="alice")[0])
    store.upload(tmp_path / "1" / "final.pth", owner="bob")  # Bob holds one of Alice's forgotten files too
    alice = [n for n in store.choices("alice") if n.endswith("(uploaded)")]
    assert alice == names[2:]  # the newest five
    assert [n for n in store.choices("bob") if n.endswith("(uploaded)")] == [names[1]]
    assert len(list((tmp_path / "uploads").iterdir())) == MAX_UPLOADS_PER_OWNER + 1  # names[0] deleted


# ----------------------------------------------------------------------------- hostile uploads


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_image_paths_outside_the_upload_are_never_read_and_say_nothing(server, tmp_path):
    import json

    c = client(server)
    secret = tmp_path / "secret.png"  # a server file that exists, next to one that does not
    png(secret)
    docs = {}
    for name, target in (("exists.json", str(secret)), ("missing.json", str(tmp_path / "nope.png")),
                         ("dotdot.json", "../../secret.png")):
        docs[name] = json.dumps({"version": "5.4.1", "flags": {}, "imagePath": target, "imageData": None,
                                 "imageHeight": 40, "imageWidth": 48,
                                 "shapes": [{"label": "cat", "points": [[1, 1], [20, 1], [20, 20]],
                                             "shape_type": "polygon", "flags": {}, "group_id": None}]}).encode()
    upload = _zip(tmp_path / "paths.zip", docs)
    with pytest.raises(Exception) as refused:
        c.predict([handle_file(str(upload))], "voc", "error", None, None, False, api_name="/convert")
    text = str(refused.value)
    import re

    answers = set()
    for name in docs:  # the same answer, whether or not the path exists on the server
        found = re.search(rf"{name}: image '[^']*' (not found in the input folder or zip[^)]*\))", text)
        assert found, (name, text)
        answers.add(found.group(1))
    assert len(answers) == 1, answers
    assert "Nothing was converted" in text


def test_zips_past_the_request_budget_are_refused_and_leave_nothing(server, tmp_path):
    _, root, _ = server
    c = client(server)
    jobs, before = root / "app" / "jobs", files_under(root / "app" / "jobs")
    # three zips of 1.5 MB unpacked each (zeros: a few KB packed): each alone fits, together they do not
    zips = [_zip(tmp_path / f"part{i}.zip", {f"pad{i}.bin": bytes(1_500_000)}) for i in range(3)]
    with pytest.raises(Exception, match="part2.zip") as refused:
        c.predict([handle_file(str(z)) for z in zips], "voc", "error", None, None, False, api_name="/convert")
    assert f"{UNPACKED_BYTES:,}" in str(refused.value)  # the request's budget, named in the answer
    # nothing added; earlier tests' results may expire meanwhile (they are kept a minute for the download)
    assert files_under(jobs) - before == set()  # the extractions of the first two zips are gone too


def test_oversized_embedded_image_is_refused_from_its_header(server, tmp_path):
    import base64
    import io
    import json

    c = client(server)
    big = io.BytesIO()
    Image.new("L", (6000, 5000)).save(big, format="PNG")  # 30 megapixels over the 25 MP cap, ~30 KB packed
    assert len(big.getvalue()) < 200_000
    doc = {"version": "5.4.1", "flags": {}, "imagePath": "big.png", "imageHeight": 5000, "imageWidth": 6000,
           "imageData": base64.b64encode(big.getvalue()).decode(),
           "shapes": [{"label": "cat", "points": [[1, 1], [20, 1], [20, 20]], "shape_type": "polygon",
                       "flags": {}, "group_id": None}]}
    path = tmp_path / "big.json"
    path.write_text(json.dumps(doc))
    started = time.monotonic()
    with pytest.raises(Exception, match="exceeds the cap"):
        c.predict([handle_file(str(path))], "voc", "error", None, None, False, api_name="/convert")
    with pytest.raises(Exception, match="exceeds the cap|could be evaluated"):
        c.predict(annotation_files=[handle_file(str(path))], weights="tiny.pth", test_size=TEST_SIZE,
                  api_name="/evaluate")
    assert time.monotonic() - started < 120  # refused from the header, not after decoding 30 MP twice
