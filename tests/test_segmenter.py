import io

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import TINY_BLOCKS, TINY_CH, randomize_, scene_image, tiny_checkpoint
from PIL import Image
from reference_deeplab import DenseCRF as RefCRF
from reference_deeplab import reference_inference, reference_model, reference_preprocessing

from segcore import ImageError, Segmenter, build_model
from segcore.image import load_image, resize_long_side
from segcore.segmenter import class_argmax, upsample_argmax


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.pth", n_classes=21, seed=5)


def _reference(ckpt_path, rgb, test_size, crf):
    ref = reference_model(21, TINY_BLOCKS, ch=TINY_CH).eval()
    ref.load_state_dict(torch.load(ckpt_path, weights_only=True))
    image, raw = reference_preprocessing(rgb[..., ::-1].copy(), test_size)
    return reference_inference(ref, image, raw, RefCRF() if crf else None)


@pytest.mark.parametrize("crf", [False, True])
def test_label_map_matches_reference_pipeline(ckpt, crf):
    rgb = scene_image(97, 129, seed=1)  # long side == test_size: the reference's output size is ours
    seg = Segmenter.from_pretrained(str(ckpt), crf=crf, test_size=129, device="cpu", precision="fp32")
    ours = seg.predict(rgb).label_map
    ref = _reference(ckpt, rgb, 129, crf)
    assert ours.shape == ref.shape == (97, 129)
    assert (ours == ref).mean() >= 0.99
    assert len(np.unique(ref)) > 1  # the comparison is not between two constant maps


def test_resize_matches_opencv():
    for shape, size in (((480, 640, 3), 513), ((300, 200, 3), 513), ((77, 51, 3), 33), ((1000, 750), 513)):
        img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        ours = resize_long_side(img, size)
        scale = size / max(shape[:2])
        ref = cv2.resize(img, dsize=None, fx=scale, fy=scale)
        assert ours.shape == ref.shape
        diff = np.abs(ours.astype(int) - ref.astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() >= 0.999


def test_upsample_argmax_equals_interpolate_in_bands():
    scores = torch.randn(21, 37, 53)
    expected = F.interpolate(scores[None], size=(150, 211), mode="bilinear", align_corners=False)[0].argmax(0)
    got = upsample_argmax(scores, (150, 211), budget_bytes=21 * 211 * 4 * 7)  # 7 rows a band
    assert (got == expected).float().mean() >= 0.999


def test_upsample_argmax_breaks_ties_towards_the_first_class():
    scores = torch.zeros(5, 4, 6)
    scores[2:, :, 3:] = 1.0  # classes 2, 3 and 4 tie on the right half; 0..4 all tie on the left
    got = upsample_argmax(scores, (8, 12))
    assert (got[:, :5] == 0).all() and (got[:, 5:] == 2).all()
    scores[3, 1, 1] = float("nan")  # argmax's NaN rule too: a NaN counts as the maximum
    assert torch.equal(class_argmax(scores), scores.argmax(0)) and class_argmax(scores)[1, 1] == 3


def test_output_is_at_the_original_size_and_consistent(ckpt):
    rgb = scene_image(200, 300, seed=2)
    seg = Segmenter.from_pretrained(str(ckpt), test_size=97, device="cpu", precision="fp32")
    pred = seg.predict(rgb, return_probs=True)
    assert pred.label_map.shape == (200, 300) and pred.label_map.dtype == np.uint8
    assert pred.probabilities.shape == (21, 65, 97)
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, rtol=1e-5)
    # the full-size map is the processing-size scores resized, so it agrees with their argmax
    small = pred.probabilities.argmax(0)
    nearest = np.asarray(Image.fromarray(pred.label_map).resize((97, 65), Image.NEAREST))
    assert (nearest == small).mean() >= 0.95
    assert pred.class_names == seg.class_names and pred.class_names[15] == "person"


def test_batch_equals_single(ckpt):
    seg = Segmenter.from_pretrained(str(ckpt), test_size=65, device="cpu", precision="fp32", batch_size=2)
    images = [scene_image(65, 49, seed=i) for i in range(3)] + [scene_image(40, 65, seed=9)]
    batch = seg.predict_batch(images)
    for img, pred in zip(images, batch):
        assert np.array_equal(seg.predict(img).label_map, pred.label_map)


def test_with_options_shares_the_model(ckpt):
    seg = Segmenter.from_pretrained(str(ckpt), test_size=65, device="cpu", precision="fp32")
    single = seg.with_options(scales=())
    assert single.model is seg.model and single.scales == () and seg.scales == (0.5, 0.75)
    img = scene_image(65, 65)
    model = seg.model
    with torch.no_grad():
        x = seg.to_tensor([img])
        assert torch.equal(single.logits(x), model.base(x))
        assert torch.equal(seg.logits(x), model(x))
    with pytest.raises(TypeError):
        seg.with_options(device="cuda")


def test_prediction_helpers(ckpt):
    seg = Segmenter.from_pretrained(str(ckpt), test_size=65, device="cpu", precision="fp32")
    img = scene_image(64, 80)
    pred = seg.predict(img)
    fr = pred.class_fractions()
    assert abs(sum(fr.values()) - 1) < 1e-9 and list(fr.values()) == sorted(fr.values(), reverse=True)
    for name, share in fr.items():
        assert share == pytest.approx((pred.label_map == seg.class_names.index(name)).mean())
    assert np.array_equal(pred.overlay(0.0), img)
    assert np.array_equal(pred.overlay(1.0), seg.palette[pred.label_map])
    half = pred.overlay(0.5).astype(int)
    assert np.abs(half - (img.astype(int) + seg.palette[pred.label_map]) / 2).max() <= 0.5 + 1e-9
    pil = pred.to_pil()
    assert pil.mode == "P" and np.array_equal(np.asarray(pil), pred.label_map)
    assert pil.getpalette()[:6] == [0, 0, 0, 128, 0, 0]  # VOC background black, aeroplane dark red
    with pytest.raises(ValueError):
        pred.overlay(1.5)


def test_label_names_from_metadata_and_class_count(tmp_path):
    generic = tiny_checkpoint(tmp_path / "g.pth", n_classes=3)
    seg = Segmenter.from_pretrained(str(generic), device="cpu")
    assert seg.class_names == ("class_0", "class_1", "class_2") and seg.palette.shape == (3, 3)
    named = tiny_checkpoint(tmp_path / "n.safetensors", n_classes=3, meta={"class_names": ["sky", "road", "car"]})
    assert Segmenter.from_pretrained(str(named), device="cpu").class_names == ("sky", "road", "car")
    coco = tiny_checkpoint(tmp_path / "c.pth", n_classes=182)
    assert Segmenter.from_pretrained(str(coco), device="cpu").class_names[0] == "person"


@pytest.mark.slow
@pytest.mark.parametrize("crf", [False, True])
def test_full_resnet101_segmenter_matches_reference(tmp_path, crf):
    model = randomize_(build_model(21), seed=11).eval()
    torch.save(model.state_dict(), tmp_path / "full.pth")
    rgb = scene_image(770, 1026, seed=4)  # resized to 385x513 by both pipelines
    seg = Segmenter.from_pretrained(str(tmp_path / "full.pth"), device="cpu", precision="fp32", crf=crf)
    pred = seg.predict(rgb, return_probs=True)
    assert pred.label_map.shape == (770, 1026) and pred.processing_size == (385, 513)
    ours = pred.probabilities.argmax(0)
    ref = reference_model(21).eval()
    ref.load_state_dict(model.state_dict())
    image, raw = reference_preprocessing(rgb[..., ::-1].copy(), 513)
    expected = reference_inference(ref, image, raw, RefCRF() if crf else None)
    assert ours.shape == expected.shape
    assert (ours == expected).mean() >= 0.99
    assert len(np.unique(expected)) > 1


# -- image inputs ---------------------------------------------------------------------------------

def _png_bytes(image, **kw):
    buf = io.BytesIO()
    image.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_image_modes_are_normalised():
    rgb = scene_image(20, 30)
    gray = Image.fromarray(rgb[..., 0])
    assert np.array_equal(load_image(gray), np.repeat(rgb[..., :1], 3, 2))
    rgba = np.dstack([rgb, np.full((20, 30), 255, np.uint8)])
    assert np.array_equal(load_image(Image.fromarray(rgba, "RGBA")), rgb)
    transparent = rgba.copy()
    transparent[..., 3] = 0
    assert (load_image(Image.fromarray(transparent, "RGBA")) == 255).all()  # shown over white
    pal = Image.fromarray(rgb).convert("P")
    assert np.array_equal(load_image(pal), np.asarray(pal.convert("RGB")))
    sixteen = (rgb[..., 1].astype(np.uint16) * 257)
    assert np.array_equal(load_image(Image.fromarray(sixteen))[..., 0], rgb[..., 1])
    assert np.array_equal(load_image(sixteen), np.repeat(rgb[..., 1:2], 3, 2))
    assert np.array_equal(load_image(_png_bytes(Image.fromarray(rgb))), rgb)


def test_exif_rotation_is_applied(tmp_path):
    rgb = scene_image(20, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    assert load_image(path).shape == (30, 20, 3)


def test_bad_images_get_clear_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, not an image")
    good = _png_bytes(Image.fromarray(scene_image(40, 40)))
    (tmp_path / "trunc.png").write_bytes(good[: len(good) // 2])
    jpg = _png_bytes(Image.fromarray(scene_image(64, 64)), format="JPEG")
    (tmp_path / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    Image.new("RGB", (1, 1)).save(tmp_path / "one.png")
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    cases = {"empty.png": "empty", "text.png": "not an image", "trunc.png": "decode", "trunc.jpg": "decode",
             "one.png": "too small", "missing.png": "no such file"}
    for name, words in cases.items():
        with pytest.raises(ImageError, match=words) as err:
            load_image(tmp_path / name)
        assert name in str(err.value)
    with pytest.raises(ImageError, match="exceeds the cap"):
        load_image(tmp_path / "big.png", max_pixels=50_000)
    assert load_image(tmp_path / "big.png", max_pixels=60_000).shape == (200, 300, 3)


def test_segmenter_enforces_its_pixel_cap(ckpt):
    seg = Segmenter.from_pretrained(str(ckpt), test_size=65, device="cpu", max_pixels=1000)
    with pytest.raises(ImageError, match="cap"):
        seg.predict(scene_image(40, 40))


def test_bf16_path_agrees_with_fp32(ckpt):
    fp32 = Segmenter.from_pretrained(str(ckpt), test_size=97, device="cpu", precision="fp32")
    bf16 = Segmenter.from_pretrained(str(ckpt), test_size=97, device="cpu", precision="bf16")
    img = scene_image(73, 97, seed=3)
    agree = (fp32.predict(img).label_map == bf16.predict(img).label_map).mean()
    assert agree >= 0.9  # tiny random models are rounding-sensitive; issue 8 sets the real bar


@pytest.mark.gpu
def test_cuda_segmenter_matches_cpu(ckpt):
    cpu = Segmenter.from_pretrained(str(ckpt), test_size=97, device="cpu", precision="fp32")
    gpu = Segmenter.from_pretrained(str(ckpt), test_size=97, device="cuda", precision="fp32")
    img = scene_image(73, 97, seed=3)
    assert (cpu.predict(img).label_map == gpu.predict(img).label_map).mean() >= 0.99
