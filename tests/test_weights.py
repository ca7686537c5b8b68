"""The weight registry against the reference's own documents, and downloads from a loopback server."""

import hashlib
import inspect
import http.server
import re
import socket
import threading
from pathlib import Path

import pytest
import torch
import yaml
from factories import tiny_model

from segcore import REGISTRY, DownloadError, Segmenter, load_model
from segcore.weights import Weights, cache_dir, download

REFERENCE = Path(__file__).parent / "reference_data" / "deeplab_pytorch"  # verbatim, see SOURCE.md there
SCORE_COLUMNS = ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou")  # the README tables' order


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


def _published(url: str) -> tuple[dict, dict]:
    """The reference README's scores for the weights it links at ``url``: (without CRF, with CRF)."""
    rows = re.findall(r"<tr>(.*?)</tr>", (REFERENCE / "README-performance.md").read_text(), re.S)
    (at,) = [i for i, row in enumerate(rows) if f'href="{url}"' in row]
    assert "&#10003;" in rows[at + 1]  # the row below is the same weights with the CRF

    def scores(row):
        cells = [re.sub(r"<[^>]+>", "", cell).strip() for cell in
                 re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        numbers = [float(cell) for cell in cells if re.fullmatch(r"\d+\.\d+", cell)]
        assert len(numbers) == len(SCORE_COLUMNS), row
        return dict(zip(SCORE_COLUMNS, numbers))

    return scores(rows[at]), scores(rows[at + 1])


def test_the_registry_holds_every_published_weight():
    linked = re.findall(r'href="(https://github.com/kazuto1011/[^"]+\.pth)"',
                        (REFERENCE / "README-performance.md").read_text())
    assert len(linked) == 3 and sorted(w.url for w in REGISTRY.values()) == sorted(linked)


@pytest.mark.parametrize("name", ["voc12", "cocostuff164k", "cocostuff10k"])
def test_registry_entry_matches_the_references_readme_and_config(name):
    weights = REGISTRY[name]
    config = yaml.safe_load((REFERENCE / f"{name}.yaml").read_text())
    assert config["EXP"]["ID"] == name and weights.url.rsplit("/", 1)[1] == weights.filename
    plain, crf = _published(weights.url)
    assert {key: weights.published[key] for key in SCORE_COLUMNS} == plain
    assert weights.published.get("mean_iou_crf", crf["mean_iou"]) == crf["mean_iou"]
    assert weights.n_classes == config["DATASET"]["N_CLASSES"] == len(weights.label_space().class_names)
    mean = config["IMAGE"]["MEAN"]
    assert weights.mean_bgr == (mean["B"], mean["G"], mean["R"])
    # the registry carries no test size: the Segmenter's default is the one the reference tests at
    assert inspect.signature(Segmenter.from_pretrained).parameters["test_size"].default \
        == config["IMAGE"]["SIZE"]["TEST"]
    assert weights.crf == {key.lower(): value for key, value in config["CRF"].items()}


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
