import hashlib
import http.server
import socket
import threading

import pytest
import torch
from factories import tiny_model

from segcore import REGISTRY, DownloadError, Segmenter, load_model
from segcore.weights import Weights, cache_dir, download


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802
        body, mode = self.routes.get(self.path, (None, None))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        announced = len(body) + (1000 if mode in ("drop", "short") else 0)
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        if mode == "drop":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Handler.routes = {}
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler.routes
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCORE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _checkpoint_bytes(tmp_path, n_classes=21):
    path = tmp_path / "src.pth"
    torch.save(tiny_model(n_classes).state_dict(), path)
    return path.read_bytes()


def test_registry_carries_the_published_metadata():
    assert set(REGISTRY) == {"voc12", "cocostuff164k", "cocostuff10k"}
    base = "https://github.com/kazuto1011/deeplab-pytorch/releases/download/v1.0/"
    voc = REGISTRY["voc12"]
    assert voc.url == base + "deeplabv2_resnet101_msc-vocaug-20000.pth" and voc.n_classes == 21
    assert voc.published == {"pixel_accuracy": 94.64, "mean_accuracy": 86.50, "mean_iou": 76.65,
                             "fw_iou": 90.41, "mean_iou_crf": 77.93}
    assert REGISTRY["cocostuff164k"].url == base + "deeplabv2_resnet101_msc-cocostuff164k-100000.pth"
    assert REGISTRY["cocostuff10k"].url == base + "deeplabv2_resnet101_msc-cocostuff10k-20000.pth"
    assert REGISTRY["cocostuff10k"].published["mean_iou"] == 34.8 and REGISTRY["cocostuff164k"].n_classes == 182
    assert len(voc.label_space().class_names) == 21 and len(REGISTRY["cocostuff10k"].label_space().class_names) == 182
    assert voc.mean_bgr == (104.008, 116.669, 122.675)
    assert voc.crf == dict(iter_max=10, pos_w=3, pos_xy_std=1, bi_w=4, bi_xy_std=67, bi_rgb_std=3)


def test_cache_dir_follows_segcore_home(home):
    assert cache_dir() == home
    assert REGISTRY["voc12"].path == home / "deeplabv2_resnet101_msc-vocaug-20000.pth"


def test_download_and_load_from_a_loopback_server(server, home, tmp_path):
    url, routes = server
    body = _checkpoint_bytes(tmp_path)
    routes["/w.pth"] = (body, None)
    weights = Weights("test", "w.pth", 21, "voc", "test", {}, url=url + "/w.pth",
                      sha256=hashlib.sha256(body).hexdigest())
    path = weights.fetch(progress=False)
    assert path == home / "w.pth" and path.read_bytes() == body
    assert list(home.iterdir()) == [path]
    routes.clear()  # a second fetch uses the cache, not the network
    assert weights.fetch(progress=False) == path
    assert load_model(path).base.aspp.c0.out_channels == 21


def test_registry_name_loads_through_the_cache(server, home, tmp_path, monkeypatch):
    url, routes = server
    routes["/voc.pth"] = (_checkpoint_bytes(tmp_path), None)
    monkeypatch.setitem(REGISTRY, "voc12", Weights("voc12", "voc.pth", 21, "voc", "VOC", {}, url=url + "/voc.pth"))
    seg = Segmenter.from_pretrained("voc12", device="cpu")
    assert seg.class_names[15] == "person" and seg.name == "voc12"


@pytest.mark.parametrize("mode", ["drop", "short"])
def test_broken_transfers_leave_nothing(server, home, tmp_path, mode):
    url, routes = server
    routes["/w.pth"] = (_checkpoint_bytes(tmp_path), mode)
    with pytest.raises(DownloadError) as err:
        download(url + "/w.pth", home / "w.pth", progress=False, timeout=5)
    assert "w.pth" in str(err.value)
    assert list(home.iterdir()) == []


def test_wrong_checksum_leaves_nothing(server, home):
    url, routes = server
    routes["/w.pth"] = (b"x" * 5000, None)
    with pytest.raises(DownloadError, match="SHA-256"):
        download(url + "/w.pth", home / "w.pth", progress=False, sha256="0" * 64)
    assert list(home.iterdir()) == []


def test_offline_error_names_url_and_path(home):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/deeplab.pth"
    with pytest.raises(DownloadError) as err:
        download(url, home / "deeplab.pth", progress=False, timeout=5)
    assert url in str(err.value) and str(home / "deeplab.pth") in str(err.value)
    assert list(home.iterdir()) == []


def test_http_error_is_reported(server, home):
    url, _ = server
    with pytest.raises(DownloadError, match="404"):
        download(url + "/missing.pth", home / "m.pth", progress=False)
    assert list(home.iterdir()) == []
