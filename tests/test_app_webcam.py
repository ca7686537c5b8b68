"""The webcam tab's stream endpoint against a real `python app.py` on loopback, driven as the browser does.

gradio_client does not drive a stream event, so the test uses Gradio's queue protocol directly:
``POST /gradio_api/queue/join`` sends the first frame and returns the event id, the session's server-sent
events (``GET /gradio_api/queue/data``) carry one ``process_streaming`` message per segmented frame, each
next frame goes to ``POST /gradio_api/stream/<event id>``, and ``POST .../close`` ends the stream. Frames are
JPEG data URLs, as the browser's canvas sends them.
"""

from __future__ import annotations

import base64
import io
import json
import re
import urllib.request
import uuid

import numpy as np
import pytest
from factories import scene_image, tiny_checkpoint
from PIL import Image
from app_server import TEST_SIZE, running_server, tiny_segmenter

httpx = pytest.importorskip("httpx")

MAX_IMAGE_PIXELS = 100_000


def jpeg_frame(h: int, w: int, seed: int = 0) -> tuple[dict, np.ndarray]:
    """A frame as the browser streams it (a JPEG data URL), and the RGB array the server decodes from it."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(scene_image(h, w, seed=seed))).save(buf, format="JPEG", quality=90)
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"url": url, "meta": {"_type": "gradio.FileData"}}, decoded


class WebcamStream:
    """One browser session streaming its camera to the app's ``segment_frame`` event."""

    def __init__(self, url: str, weights: str = "tiny.pth", opacity: float = 0.5, test_size: int = TEST_SIZE):
        self.http = httpx.Client(base_url=url + "gradio_api/", timeout=120)
        config = json.loads(self.http.get(url + "config").text)
        event = next(d for d in config["dependencies"] if d.get("api_name") == "segment_frame")
        assert event["connection"] == "stream"
        self.fn_index, self.trigger = event["id"], event["targets"][0][0]
        self.settings = [weights, opacity, test_size]
        self.session = uuid.uuid4().hex
        self.event_id = None
        self.last = None
        """The latest ``process_streaming`` or ``process_completed`` message."""
        self._messages = None

    def _body(self, frame: dict) -> dict:
        return {"data": [frame, *self.settings], "event_data": None, "fn_index": self.fn_index,
                "trigger_id": self.trigger, "session_hash": self.session}

    def send(self, frame: dict) -> dict:
        """Send a frame (the first one starts the stream) and return the server's next message about it:
        ``process_streaming`` with the outputs, or ``process_completed`` when the stream ended."""
        if self.event_id is None:
            joined = self.http.post("queue/join", json=self._body(frame))
            joined.raise_for_status()
            self.event_id = joined.json()["event_id"]
            self._response = self.http.stream("GET", "queue/data", params={"session_hash": self.session})
            self._messages = self._events(self._response.__enter__())
        else:
            sent = self.http.post(f"stream/{self.event_id}", json=self._body(frame))
            sent.raise_for_status()
        return self._next()

    def _events(self, response):
        for line in response.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("event_id") == self.event_id:
                    yield message

    def _next(self) -> dict:
        for message in self._messages:
            if message["msg"] in ("process_streaming", "process_completed"):
                self.last = message
                return message
        raise AssertionError("the event stream ended without an answer")

    def close(self) -> dict | None:
        """Stop the camera (unless the server ended the stream); returns the stream's final message."""
        if self.event_id is not None:
            if self.last is None or self.last["msg"] != "process_completed":
                self.http.post(f"stream/{self.event_id}/close").raise_for_status()
                while self._next()["msg"] != "process_completed":
                    pass
            self._response.__exit__(None, None, None)
        self.http.close()
        return self.last

    def image(self, message: dict) -> np.ndarray:
        """The segmented frame a ``process_streaming`` message points to, downloaded as the browser does."""
        out = message["output"]["data"][0]
        with urllib.request.urlopen(out["url"], timeout=60) as r:
            return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("webcam")
    ckpt = tiny_checkpoint(root / "tiny.pth")
    with running_server(root / "server", ckpt, SEGCORE_MAX_IMAGE_PIXELS=MAX_IMAGE_PIXELS) as (url, _):
        yield url, ckpt


def assert_segmented(stream: WebcamStream, message: dict, frame: np.ndarray, ckpt) -> None:
    assert message["msg"] == "process_streaming" and message["success"], message
    got = stream.image(message).astype(np.int16)
    want = tiny_segmenter(ckpt).predict(frame).overlay(0.5).astype(np.int16)
    assert got.shape == frame.shape
    # the overlay comes back as a JPEG: close to the overlay computed here, far from the camera frame itself
    near, far = np.abs(got - want).mean(), np.abs(got - frame.astype(np.int16)).mean()
    assert near < 10 and near < far / 4, (near, far)
    assert "frames/s" in message["output"]["data"][1]


def test_streamed_frames_come_back_segmented(server):
    url, ckpt = server
    stream = WebcamStream(url)
    try:
        for seed in (1, 2):  # the first frame starts the stream, the second goes through /stream/<event id>
            payload, frame = jpeg_frame(96, 128, seed=seed)
            assert_segmented(stream, stream.send(payload), frame, ckpt)
    finally:
        last = stream.close()
    assert last is not None and last["msg"] == "process_completed" and last["success"]


@pytest.mark.parametrize("first", [True, False], ids=["first-frame", "later-frame"])
def test_over_cap_frame_is_refused_and_others_are_still_answered(server, first):
    url, ckpt = server
    big, _ = jpeg_frame(400, 300)  # 120,000 pixels over the server's cap of 100,000: 6 KB of JPEG
    attacker = WebcamStream(url)
    try:
        if not first:
            payload, frame = jpeg_frame(96, 128, seed=3)
            assert_segmented(attacker, attacker.send(payload), frame, ckpt)
        refused = attacker.send(big)
    finally:
        attacker.close()
    assert refused["msg"] == "process_completed" and not refused["success"]
    error = refused["output"]["error"]
    assert error and error.startswith("webcam frame:"), error
    assert re.search(r"exceeds .*100,?000 pixels", error), error  # the server's cap, in words

    visitor = WebcamStream(url)  # the next camera gets the stream and its frames segmented
    try:
        payload, frame = jpeg_frame(96, 128, seed=4)
        assert_segmented(visitor, visitor.send(payload), frame, ckpt)
    finally:
        visitor.close()
    with urllib.request.urlopen(url + "config", timeout=30) as r:
        assert r.status == 200
