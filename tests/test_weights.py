"""Offline torchvision -> Flax weight import (deep/weights.py) on a tiny ResNet and on ResNet-50's shapes."""

import importlib.util
import os
import stat
import sys
import types
import zipfile

import numpy as np
import pytest
from flax import nnx

from deep import perceptual, weights
from deep.backbone import BackboneConfig, ResNet, resnet50, torchvision_key

TINY = BackboneConfig(depths=(1, 1, 1, 1), width=2)


def _variables(backbone):
    """``torchvision key -> (nnx path, value)`` of every backbone variable."""
    return {torchvision_key(path): (path, np.asarray(variable.get_value()))
            for path, variable in nnx.to_flat_state(nnx.state(backbone))}


def _torchvision_arrays(seed=0):
    """A synthetic torchvision state dict for TINY: keys from the backbone, OIHW kernels, random float32 values,
    plus what a real file also holds (fc, num_batches_tracked)."""
    rng = np.random.default_rng(seed)
    abstract = nnx.eval_shape(lambda: ResNet(TINY, nnx.Rngs(0)))
    arrays = {}
    for path, variable in nnx.to_flat_state(nnx.state(abstract)):
        shape = variable.get_value().shape
        if path[-1] == "kernel":
            out_channels, in_channels, (height, width) = shape[3], shape[2], shape[:2]
            shape = (out_channels, in_channels, height, width)
        value = rng.uniform(0.5, 2.0, size=shape) if path[-1] == "var" else rng.normal(size=shape)
        arrays[torchvision_key(path)] = value.astype(np.float32)
    arrays["bn1.num_batches_tracked"] = np.array(7, dtype=np.int64)
    arrays["fc.weight"] = rng.normal(size=(10, 8 * TINY.width * 4)).astype(np.float32)
    arrays["fc.bias"] = np.zeros(10, np.float32)
    return arrays


@pytest.fixture(scope="module")
def torchvision_arrays():
    return _torchvision_arrays()


def _write(path, arrays):
    np.savez(path, **arrays)
    return path


def test_load_assigns_every_variable_with_kernels_transposed(tmp_path, torchvision_arrays):
    backbone = ResNet(TINY, nnx.Rngs(1))
    weights.load_torchvision_npz(backbone, _write(tmp_path / "tiny.npz", torchvision_arrays))
    loaded = _variables(backbone)
    assert len(loaded) == len(torchvision_arrays) - 3
    for key, (path, value) in loaded.items():
        expected = torchvision_arrays[key]
        if path[-1] == "kernel":
            expected = expected.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, expected, err_msg=key)


def test_load_into_a_dual_stream_model_fills_its_backbone(tmp_path, torchvision_arrays):
    from deep.model import DualStreamModel, ModelConfig

    config = ModelConfig(backbone=TINY, tasks=(("depth", 1),), semantic_channels=4, residual_channels=4,
                         head_channels=4, aspp_rates=(1,), grounding="none")
    model = DualStreamModel(config, nnx.Rngs(0))
    weights.load_torchvision_npz(model, _write(tmp_path / "tiny.npz", torchvision_arrays))
    np.testing.assert_array_equal(np.asarray(model.backbone.bn1.var.get_value()), torchvision_arrays["bn1.running_var"])


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_arrays_of_another_floating_type_are_cast_to_the_variables_float32(tmp_path, torchvision_arrays, dtype):
    """A file saved in float64 (numpy's default) or float16 loads as float32, the variables' dtype: kept as it was,
    a float64 array would change the state's dtype (the suite runs with x64 on) and so its structure for jit and
    the optimiser. The values are the file's, rounded once to float32."""
    arrays = {key: value.astype(dtype) if value.dtype == np.float32 else value
              for key, value in torchvision_arrays.items()}
    backbone = ResNet(TINY, nnx.Rngs(1))
    weights.load_torchvision_npz(backbone, _write(tmp_path / "wide.npz", arrays))
    for key, (path, value) in _variables(backbone).items():
        expected = arrays[key].transpose(2, 3, 1, 0) if path[-1] == "kernel" else arrays[key]
        assert value.dtype == np.float32, (key, value.dtype)
        np.testing.assert_array_equal(value, expected.astype(np.float32), err_msg=key)


def test_only_the_classifier_and_the_batch_counters_are_ignored():
    """What a torchvision file may hold besides the backbone is exactly ``fc.*`` and ``*.num_batches_tracked``; a key
    that only starts or ends like them (another network's ``fc1``/``fcn`` layers, a renamed counter) is unexpected,
    so that the check names it rather than skipping it."""
    assert all(map(weights.is_ignored_key, ["fc.weight", "fc.bias", "num_batches_tracked",
                                            "layer1.0.bn1.num_batches_tracked",
                                            "layer1.0.downsample.1.num_batches_tracked"]))
    assert not any(map(weights.is_ignored_key, ["fc1.weight", "fcn.head.bias", "bn1.running_num_batches_tracked",
                                                "layer1.fc.weight", "bn1.weight"]))


def test_an_npz_holding_pickled_objects_is_refused_unread(tmp_path):
    """read_npz loads with ``allow_pickle=False``: an object array (pickled, so loading it would run whatever its
    pickle says) makes the file unreadable, before any key is looked at."""
    np.savez(tmp_path / "pickled.npz", **{"conv1.weight": np.array([{"not": "an array"}], dtype=object)})
    with pytest.raises(ValueError, match=r"pickled\.npz is not a readable \.npz archive \(.*allow_pickle"):
        weights.read_npz(tmp_path / "pickled.npz")


def test_missing_misshapen_and_unexpected_keys_are_rejected_by_name(tmp_path, torchvision_arrays):
    backbone = ResNet(TINY, nnx.Rngs(1))
    before = _variables(backbone)
    missing = {k: v for k, v in torchvision_arrays.items() if k != "layer2.0.downsample.0.weight"}
    with pytest.raises(ValueError, match=r"missing backbone key 'layer2\.0\.downsample\.0\.weight' \(shape "
                                         r"\(16, 8, 1, 1\)\)$"):
        weights.load_torchvision_npz(backbone, _write(tmp_path / "missing.npz", missing))
    misshapen = {**torchvision_arrays, "layer1.0.conv2.weight": np.zeros((2, 2, 1, 3), np.float32)}
    with pytest.raises(ValueError, match=r"'layer1\.0\.conv2\.weight' has shape \(2, 2, 1, 3\), expected "
                                         r"\(2, 2, 3, 3\)"):
        weights.load_torchvision_npz(backbone, _write(tmp_path / "misshapen.npz", misshapen))
    extra = {**torchvision_arrays, "layer5.0.conv1.weight": np.zeros(1, np.float32)}
    with pytest.raises(ValueError, match=r"1 key\(s\) the backbone does not have, first 'layer5\.0\.conv1\.weight'"):
        weights.load_torchvision_npz(backbone, _write(tmp_path / "extra.npz", extra))
    prefixed = {f"module.{k}": v for k, v in torchvision_arrays.items()}
    with pytest.raises(ValueError, match="missing backbone key 'bn1.bias'.*first 'module.bn1.bias'.*stripped"):
        weights.load_torchvision_npz(backbone, _write(tmp_path / "prefixed.npz", prefixed))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.load_torchvision_npz(backbone, tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    np.save(tmp_path / "one_array.npy", np.zeros(3))  # np.load returns a plain array for it
    for junk in ("junk.npz", "one_array.npy"):
        with pytest.raises(ValueError, match=r"not a readable \.npz archive \(not a zip file of \.npy arrays"):
            weights.load_torchvision_npz(backbone, tmp_path / junk)
    with zipfile.ZipFile(tmp_path / "bytes.npz", "w") as archive:  # np.load would hand the member over as bytes
        archive.writestr("conv1.weight.npy", b"not an array")
    with pytest.raises(ValueError, match=r"bytes\.npz is not a readable \.npz archive \(member 'conv1\.weight' is "
                                         r"not a \.npy array\)$"):
        weights.load_torchvision_npz(backbone, tmp_path / "bytes.npz")
    with zipfile.ZipFile(tmp_path / "resnet50.pth", "w") as archive:  # torch.save's layout: a zip too
        archive.writestr("resnet50/data.pkl", b"")
    with pytest.raises(ValueError, match=r"resnet50\.pth is a PyTorch checkpoint, not an \.npz: convert it first"):
        weights.load_torchvision_npz(backbone, tmp_path / "resnet50.pth")
    with pytest.raises(ValueError, match="expected a deep.backbone.ResNet"):
        weights.load_torchvision_npz(object(), tmp_path / "missing.npz")
    after = _variables(backbone)  # every rejection left the model untouched
    assert all(np.array_equal(before[key][1], after[key][1]) for key in before)


def test_assigning_checks_each_shape_before_anything_and_returns_the_keys_it_used(torchvision_arrays):
    """assign_torch_arrays (the loader's last step, and how the torch-reference tests load MTAN and the heads, with
    no check_state_arrays before it) refuses an array of another shape by name and assigns nothing then; the keys it
    returns are the backbone's alone (the classifier and the counters are not assigned), so a caller can tell which
    arrays found no variable."""
    backbone = ResNet(TINY, nnx.Rngs(1))
    before = _variables(backbone)
    misshapen = {**torchvision_arrays, "layer4.0.conv2.weight": np.zeros((16, 16, 1, 3), np.float32)}
    with pytest.raises(ValueError, match=r"layer4\.0\.conv2\.weight: shape \(16, 16, 1, 3\) in PyTorch layout, but "
                                         r"the variable .* needs \(16, 16, 3, 3\)"):
        weights.assign_torch_arrays(backbone, misshapen, torchvision_key)
    after = _variables(backbone)  # the variables before the misshapen one were not assigned either
    assert all(np.array_equal(before[key][1], after[key][1]) for key in before)
    used = weights.assign_torch_arrays(backbone, torchvision_arrays, torchvision_key)
    assert used == set(torchvision_arrays) - {"fc.weight", "fc.bias", "bn1.num_batches_tracked"}


def test_a_dense_layer_takes_torchs_out_by_in_weight_transposed():
    """torch.nn.Linear stores its weight (out, in) and computes x W^T + b; nnx.Linear's kernel is (in, out). A square
    layer is the case a missing transpose would pass unseen: its output is checked against torch's formula, and a
    layer of two sizes by the shapes reported and refused."""
    class Head(nnx.Module):
        def __init__(self, rngs):
            self.square, self.wide = nnx.Linear(3, 3, rngs=rngs), nnx.Linear(3, 5, rngs=rngs)

    rng = np.random.default_rng(4)
    arrays = {"square.weight": rng.normal(size=(3, 3)), "square.bias": rng.normal(size=3),
              "wide.weight": rng.normal(size=(5, 3)), "wide.bias": rng.normal(size=5)}
    key_of = lambda path: f"{path[0]}.{'weight' if path[-1] == 'kernel' else 'bias'}"  # noqa: E731
    head = Head(nnx.Rngs(0))
    assert weights.torch_shapes(head, key_of) == {key: value.shape for key, value in arrays.items()}
    assert weights.assign_torch_arrays(head, arrays, key_of) == set(arrays)
    x = rng.normal(size=(2, 3)).astype(np.float32)
    for name in ("square", "wide"):
        expected = x @ arrays[f"{name}.weight"].T + arrays[f"{name}.bias"]
        np.testing.assert_allclose(getattr(head, name)(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"wide\.weight: shape \(3, 5\) in PyTorch layout, but .* needs \(5, 3\)"):
        weights.assign_torch_arrays(head, {**arrays, "wide.weight": arrays["wide.weight"].T}, key_of)


def test_check_counts_the_backbones_arrays_not_the_files(tmp_path, torchvision_arrays):
    """The count check reports is the backbone's arrays, all found: the classifier and counters a real file also
    holds are skipped, not counted."""
    path = _write(tmp_path / "tiny.npz", torchvision_arrays)
    abstract = nnx.eval_shape(lambda: ResNet(TINY, nnx.Rngs(0)))
    assert weights.check_npz(path, abstract) == len(torchvision_arrays) - 3


def test_save_then_load_round_trips(tmp_path):
    source, target = ResNet(TINY, nnx.Rngs(3)), ResNet(TINY, nnx.Rngs(4))
    path = tmp_path / "exported.npz"
    weights.save_torchvision_npz(source, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported.npz"]  # no temporary file left behind
    with np.load(path) as archive:
        assert archive["conv1.weight"].shape == (2, 3, 7, 7)  # OIHW on disk
    weights.load_torchvision_npz(target, path)
    expected, actual = _variables(source), _variables(target)
    assert expected.keys() == actual.keys()
    for key in expected:
        np.testing.assert_array_equal(actual[key][1], expected[key][1], err_msg=key)
    weights.save_torchvision_npz(source, tmp_path / "new" / "folder" / "exported.npz")  # folders are made
    assert (tmp_path / "new" / "folder" / "exported.npz").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_files_keep_their_name_and_take_the_permissions_any_file_gets(tmp_path, compressed):
    """write_npz (behind every weights file the project writes) goes through deep.files.write_atomically: the file
    gets 0666 less the umask, not mkstemp's 0600, so others can read shared weights; no temporary is left; and the
    name is the one given, where np.savez on a path would append .npz to it."""
    arrays = {"w": np.arange(6.0).reshape(2, 3), "b": np.ones(3, np.float32)}
    path = tmp_path / "weights.bin"
    previous = os.umask(0o027)
    try:
        weights.write_npz(path, arrays, compressed=compressed)
    finally:
        os.umask(previous)
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    with zipfile.ZipFile(path) as archive:
        kinds = {info.compress_type for info in archive.infolist()}
    assert kinds == {zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED}
    read = weights.read_npz(path)
    assert read.keys() == arrays.keys() and all(np.array_equal(read[k], arrays[k]) for k in arrays)


def test_resnet50_expects_torchvisions_265_backbone_arrays():
    abstract = nnx.eval_shape(lambda: resnet50(nnx.Rngs(0)))
    shapes = weights.torchvision_shapes(abstract)
    # torchvision's resnet50 state dict: 320 entries = 53 conv weights + 53 BN × 5 + fc.weight + fc.bias.
    assert len(shapes) == 320 - 53 - 2
    assert shapes["conv1.weight"] == (64, 3, 7, 7)
    assert shapes["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert shapes["layer3.5.conv2.weight"] == (256, 256, 3, 3)
    assert shapes["layer4.2.bn3.running_var"] == (2048,)
    assert "layer4.2.downsample.0.weight" not in shapes


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="torch is installed: the real round trip runs instead")
def test_converter_without_torch_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    """Given a file to convert (a missing one is said as such first, torch or not)."""
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    (tmp_path / "in.pth").write_bytes(b"a state dict")
    with pytest.raises(ImportError, match=r"pip install 'core-mtl-toolkit\[torch\]'"):
        weights.convert_pth_to_npz(tmp_path / "in.pth", tmp_path / "out.npz")
    assert weights.main(["convert", str(tmp_path / "in.pth"), str(tmp_path / "out.npz")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "core-mtl-toolkit[torch]" in error


def test_a_command_that_lacks_a_package_is_one_line_and_status_2(capsys):
    """run_command's ImportError (PyTorch missing for convert) is bad input like a wrong file: one line, status 2,
    not a traceback. Checked without touching torch, so that it runs whether torch is installed or not."""
    def command():
        raise ImportError("converting a .pth file needs PyTorch, which is not installed")

    assert weights.run_command("python -m deep.weights", command) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ("python -m deep.weights: error: converting a .pth file needs "
                                                   "PyTorch, which is not installed\n")


class _FakeTensor:
    """The slice of ``torch.Tensor`` the converter touches, over a numpy array."""

    def __init__(self, array, dtype):
        self.array, self.dtype = array, dtype

    def detach(self):
        return self

    def cpu(self):
        return self

    def is_floating_point(self):
        return self.dtype in ("float16", "float32", "float64", "bfloat16")

    def float(self):
        return _FakeTensor(self.array.astype(np.float32), "float32")

    def numpy(self):
        if self.dtype == "bfloat16":
            raise TypeError("Got unsupported ScalarType BFloat16")
        return self.array


def _fake_torch(saved):
    """A stand-in ``torch`` module whose ``load`` returns ``saved`` (and records how it was called)."""
    module = types.ModuleType("torch")
    module.Tensor, module.float16, module.float32, module.float64 = _FakeTensor, "float16", "float32", "float64"
    module.calls = []

    def load(path, map_location=None, weights_only=False):
        module.calls.append({"map_location": map_location, "weights_only": weights_only})
        return saved

    module.load = load
    return module


def test_converter_logic_with_a_stand_in_torch(tmp_path, monkeypatch, torchvision_arrays):
    state = {key: _FakeTensor(value, str(value.dtype)) for key, value in torchvision_arrays.items()}
    state["bn1.weight"] = _FakeTensor(torchvision_arrays["bn1.weight"], "bfloat16")  # numpy has no bfloat16
    fake = _fake_torch({"state_dict": state, "epoch": 3})  # a checkpoint wrapping the state dict
    monkeypatch.setitem(sys.modules, "torch", fake)
    (tmp_path / "tiny.pth").write_bytes(b"")
    assert weights.convert_pth_to_npz(tmp_path / "tiny.pth", tmp_path / "tiny.npz") == len(torchvision_arrays)
    assert fake.calls == [{"map_location": "cpu", "weights_only": True}]
    backbone = ResNet(TINY, nnx.Rngs(1))
    weights.load_torchvision_npz(backbone, tmp_path / "tiny.npz")
    np.testing.assert_array_equal(np.asarray(backbone.layer1[0].conv2.kernel.get_value()),
                                  torchvision_arrays["layer1.0.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(backbone.bn1.scale.get_value()), torchvision_arrays["bn1.weight"])
    monkeypatch.setitem(sys.modules, "torch", _fake_torch({"conv1.weight": [1.0]}))
    with pytest.raises(ValueError, match="entry 'conv1.weight' is a list, not a tensor"):
        weights.convert_pth_to_npz(tmp_path / "tiny.pth", tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.convert_pth_to_npz(tmp_path / "absent.pth", tmp_path / "bad.npz")
    for empty in ({}, {"state_dict": {}}):  # nothing to convert: an empty .npz would only fail later, at loading
        monkeypatch.setitem(sys.modules, "torch", _fake_torch(empty))
        with pytest.raises(ValueError, match=r"tiny\.pth does not hold a state dict"):
            weights.convert_pth_to_npz(tmp_path / "tiny.pth", tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()


def test_converter_round_trip_with_torch(tmp_path, torchvision_arrays):
    torch = pytest.importorskip("torch")
    state = {key: torch.from_numpy(np.array(value)) for key, value in torchvision_arrays.items()}
    torch.save(state, tmp_path / "tiny.pth")
    assert weights.convert_pth_to_npz(tmp_path / "tiny.pth", tmp_path / "tiny.npz") == len(torchvision_arrays)
    backbone = ResNet(TINY, nnx.Rngs(1))
    weights.load_torchvision_npz(backbone, tmp_path / "tiny.npz")
    np.testing.assert_array_equal(np.asarray(backbone.conv1.kernel.get_value()),
                                  torchvision_arrays["conv1.weight"].transpose(2, 3, 1, 0))


def test_check_cli_reports_one_line(tmp_path, capsys, torchvision_arrays):
    path = _write(tmp_path / "tiny.npz", torchvision_arrays)
    assert weights.main(["check", str(path)]) == 2  # a tiny file is not ResNet-50
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "expected (64,)" in error


def test_check_cli_knows_the_resnet18_backbone(tmp_path, capsys):
    """The CelebA model's backbone: a full-shape ResNet-18 file passes ``--resnet 18`` and fails the default 50."""
    from deep.backbone import resnet18

    shapes = weights.torchvision_shapes(nnx.eval_shape(lambda: resnet18(nnx.Rngs(0))))
    path = _write(tmp_path / "resnet18.npz", {key: np.zeros(shape, np.float32) for key, shape in shapes.items()})
    assert weights.main(["check", str(path), "--resnet", "18"]) == 0
    assert f"all {len(shapes)} ResNet-18 backbone arrays present" in capsys.readouterr().out
    assert weights.main(["check", str(path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    # check_npz's own default is ResNet-50 too: its blocks are bottlenecks, with a third layer ResNet-18's lack.
    with pytest.raises(ValueError, match=r"missing backbone key 'layer\d\.\d\.(bn|conv)3\."):
        weights.check_npz(path)


@pytest.mark.parametrize("main, command", [(weights.main, ["check", "{folder}"]),
                                           (weights.main, ["convert", "{folder}", "{folder}/out.npz"]),
                                           (perceptual.main, ["check", "{folder}"])])
def test_a_folder_given_for_a_weights_file_is_called_a_folder(tmp_path, capsys, main, command):
    """Not "does not exist", which would send the user looking for a path that is there."""
    assert main([part.format(folder=tmp_path) for part in command]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.endswith(f"file {tmp_path} is a folder, not a file\n"), error


@pytest.mark.parametrize("main, argv, message", [
    (weights.main, [], "the following arguments are required: command"),
    (weights.main, ["check", "x.npz", "--resnet", "34"], "argument --resnet: invalid choice: '34'"),
    (weights.main, ["convert", "in.pth"], "the following arguments are required: npz"),
    (perceptual.main, ["check"], "the following arguments are required: npz"),
    (perceptual.main, ["train", "x"], "argument command: invalid choice: 'train'"),
])
def test_the_converters_bad_arguments_get_one_line_and_status_2(capsys, main, argv, message):
    """As every script of the project: ``PROG: error: ...`` alone, without argparse's usage lines."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.count("\n") == 1 and error.startswith("python -m deep."), error
    assert f": error: {message}" in error, error  # PROG (with its sub-command): error: ...
