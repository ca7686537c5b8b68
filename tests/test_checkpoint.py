import os
import pickle

import pytest
import torch
from factories import TINY_BLOCKS, TINY_WIDTH, tiny_model

from segcore import CheckpointError, SegcoreError, build_model, load_model
from segcore.checkpoint import read_checkpoint, save_checkpoint
from segcore.checkpoint import read_backbone, read_checkpoint_file


def _same(a, b):
    x = torch.randn(1, 3, 65, 81) * 50
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_published_layout_loads_and_infers_architecture(tmp_path):
    model = tiny_model(9, seed=1).eval()
    path = tmp_path / "ref.pth"
    torch.save(model.state_dict(), path)
    loaded = load_model(path)
    assert not loaded.training
    assert next(loaded.parameters()).dtype == torch.float32
    assert loaded.base.aspp.c0.out_channels == 9
    assert len(loaded.base.layer4) == 1 and loaded.base.layer5.block1.increase.conv.out_channels == TINY_WIDTH[3]
    assert _same(model, loaded)


def test_block_counts_come_from_the_keys(tmp_path):
    model = build_model(3, n_blocks=(2, 1, 3, 1), width=TINY_WIDTH).eval()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    loaded = load_model(tmp_path / "m.pth")
    assert [len(getattr(loaded.base, f"layer{i}")) for i in range(2, 6)] == [2, 1, 3, 1]


@pytest.mark.parametrize("variant", ["no_base", "module", "module_base", "safetensors", "wrapped"])
def test_key_variants(tmp_path, variant):
    model = tiny_model(5, seed=2).eval()
    sd = model.state_dict()
    if variant == "no_base":
        sd = {k[len("base."):]: v for k, v in sd.items()}
    elif variant == "module":
        sd = {"module." + k[len("base."):]: v for k, v in sd.items()}
    elif variant == "module_base":
        sd = {"module." + k: v for k, v in sd.items()}
    path = tmp_path / ("m.safetensors" if variant == "safetensors" else "m.pth")
    if variant in ("safetensors", "wrapped"):
        save_checkpoint(path, sd, {"class_names": list("abcde")})
        assert read_checkpoint(path).class_names == list("abcde")
    else:
        torch.save(sd, path)
    assert _same(model, load_model(path))


def test_num_batches_tracked_may_be_absent(tmp_path):
    model = tiny_model(4).eval()
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    assert _same(model, load_model(tmp_path / "old.pth"))


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path):
    sd = dict(tiny_model(4).state_dict())
    del sd["base.layer2.block1.reduce.bn.running_mean"]
    sd["base.layer9.extra.weight"] = torch.zeros(3)
    sd["base.layer3.block1.conv3x3.conv.weight"] = torch.zeros(8, 8, 1, 1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.pth")
    msg = str(err.value)
    assert "base.layer2.block1.reduce.bn.running_mean" in msg and "missing" in msg
    assert "base.layer9.extra.weight" in msg and "unexpected" in msg
    assert "base.layer3.block1.conv3x3.conv.weight" in msg and "(8, 8, 1, 1)" in msg


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    sd = dict(tiny_model(3).state_dict())
    sd["payload"] = _RunsCode(marker)
    for name, save in (("zip.pth", lambda o, p: torch.save(o, p)),
                       ("legacy.pth", lambda o, p: torch.save(o, p, _use_new_zipfile_serialization=False)),
                       ("raw.pkl", lambda o, p: p.write_bytes(pickle.dumps(o, protocol=2))),
                       ("raw4.pkl", lambda o, p: p.write_bytes(pickle.dumps(o, protocol=4)))):
        path = tmp_path / name
        save(sd, path)
        with pytest.raises(CheckpointError, match="refused") as err:
            load_model(path)
        if name.endswith(".pth"):  # raw pickles are stopped earlier, at the tensors' own storage global
            assert "posix.system" in str(err.value) or "os.system" in str(err.value)
        assert not marker.exists()


def _initialise(fmt):
    from train import init_weights

    return lambda path: init_weights.initialise(tiny_model(3), str(path), fmt)


@pytest.mark.parametrize(
    "read",
    [read_checkpoint_file, read_backbone, _initialise("backbone"), _initialise("torchvision"),
     _initialise("auto")],
    ids=["read_checkpoint_file", "read_backbone", "train-init-backbone", "train-init-torchvision",
         "train-init-auto"],
)
def test_every_reader_of_weight_files_refuses_a_pickle_that_runs_code(tmp_path, read):
    marker = tmp_path / "pwned"
    sd = dict(tiny_model(3).state_dict())
    sd["payload"] = _RunsCode(marker)
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(SegcoreError, match="refused.*os.system|refused.*posix.system"):
        read(tmp_path / "m.pth")
    assert not marker.exists()


def test_non_tensor_entries_are_refused(tmp_path):
    sd = dict(tiny_model(3).state_dict())
    sd["base.note"] = "hello"
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="not tensors"):
        load_model(tmp_path / "m.pth")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_unreadable_files(tmp_path, content):
    path = tmp_path / "x.pth"
    if content is None:
        torch.save(tiny_model(3).state_dict(), path)
        path.write_bytes(path.read_bytes()[:1000])  # truncated
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_model(path)
    with pytest.raises(CheckpointError, match="no such"):
        load_model(tmp_path / "absent.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "bad.safetensors")


def test_unknown_registry_name():
    with pytest.raises(CheckpointError, match="voc12"):
        load_model("voc2077")


def test_not_a_deeplab_state_dict(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a DeepLab-v2"):
        load_model(tmp_path / "other.pth")


def test_torchvision_style_flag_travels_in_metadata(tmp_path):
    model = build_model(3, n_blocks=TINY_BLOCKS, width=TINY_WIDTH, stride_in_1x1=False).eval()
    save_checkpoint(tmp_path / "tv.pth", model.state_dict(), {"stride_in_1x1": False})
    loaded = load_model(tmp_path / "tv.pth")
    assert loaded.base.layer3.block1.conv3x3.conv.stride == (2, 2)
    assert _same(model, loaded)
