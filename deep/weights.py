r"""Offline import of torchvision's ImageNet ResNet weights into the Flax backbone (``reference/ecosystem.md`` §4.3).

Two steps, so that the runtime never needs PyTorch and nothing is downloaded:

1. :func:`convert_pth_to_npz` (or ``python -m deep.weights convert resnet50-19c8e357.pth resnet50.npz``) turns a
   user-supplied torchvision state dict into an ``.npz`` whose keys are the state-dict keys and whose arrays keep
   PyTorch's layout (convolution weights OIHW). It imports torch lazily (``pip install 'core-mtl-toolkit[torch]'``).
2. :func:`load_torchvision_npz` reads the ``.npz`` with numpy and assigns it in place to a :class:`deep.backbone.ResNet`
   (or the ``.backbone`` of a :class:`deep.model.DualStreamModel`), checking **every** key and shape first: a
   missing, misshapen or unexpected key is an error (torch's ``strict=False``, which LibMTL uses, hides them).

The mapping is :func:`deep.backbone.torchvision_key`; convolution kernels go from OIHW to HWIO by
``transpose(2, 3, 1, 0)``, BatchNorm ``weight, bias, running_mean, running_var`` become ``scale, bias, mean, var``.
The classifier (``fc.*``) and ``*.num_batches_tracked`` are ignored. :func:`save_torchvision_npz` is the inverse.
"""

from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deep.backbone import ResNet, resnet18, resnet50, torchvision_key
from deep.cli import OneLineArgumentParser, run_command
from deep.files import write_atomically

__all__ = ["load_torchvision_npz", "save_torchvision_npz", "convert_pth_to_npz", "torchvision_shapes",
           "check_torchvision_arrays", "check_npz", "is_ignored_key", "main", "read_npz", "write_npz",
           "read_pth_state_dict", "check_state_arrays", "run_command", "OIHW_FROM_HWIO", "HWIO_FROM_OIHW",
           "torch_shapes", "assign_torch_arrays"]

DISTRIBUTION = "core-mtl-toolkit"
OIHW_FROM_HWIO = (3, 2, 0, 1)
HWIO_FROM_OIHW = (2, 3, 1, 0)


def is_ignored_key(key: str) -> bool:
    """Whether a state-dict key is not part of the backbone and is skipped: the classifier ``fc.*`` and the
    BatchNorm counters ``*.num_batches_tracked``."""
    return key.startswith("fc.") or key == "num_batches_tracked" or key.endswith(".num_batches_tracked")


def _backbone_of(target: nnx.Module) -> ResNet:
    if isinstance(target, ResNet):
        return target
    backbone = getattr(target, "backbone", None)
    if isinstance(backbone, ResNet):
        return backbone
    raise ValueError(f"expected a deep.backbone.ResNet or a model with a ResNet .backbone; got {type(target).__name__}")


def _torch_variables(module: nnx.Module, key_of: Callable[[tuple], str | None]) -> list[tuple[tuple, object, str]]:
    """``(nnx path, variable, PyTorch key)`` for every parameter and BatchNorm statistic of ``module`` that
    ``key_of(path)`` names (``None``: no PyTorch counterpart), in a fixed order."""
    variables = nnx.to_flat_state(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat)))
    return [(path, variable, key) for path, variable in variables if (key := key_of(path)) is not None]


# Kernels are stored the other way round: a convolution's OIHW against Flax's HWIO, a dense layer's (out, in)
# (torch.nn.Linear computes x W^T) against Flax's (in, out). Every other array has one layout.
_TORCH_FROM_FLAX = {4: OIHW_FROM_HWIO, 2: (1, 0)}
_FLAX_FROM_TORCH = {4: HWIO_FROM_OIHW, 2: (1, 0)}


def _axes(path: tuple, ndim: int, permutations: dict) -> tuple[int, ...]:
    """How the axes of the array at ``path`` move between the layouts: ``permutations[ndim]`` for a kernel."""
    return permutations.get(ndim, tuple(range(ndim))) if path[-1] == "kernel" else tuple(range(ndim))


def _relayout(path: tuple, value: np.ndarray, permutations: dict) -> np.ndarray:
    return np.transpose(value, _axes(path, np.ndim(value), permutations))


def _torch_shape(path: tuple, shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(shape[axis]) for axis in _axes(path, len(shape), _TORCH_FROM_FLAX))


def torch_shapes(module: nnx.Module, key_of: Callable[[tuple], str | None]) -> dict[str, tuple[int, ...]]:
    """The PyTorch key -> shape (PyTorch layout, OIHW kernels) of every variable of ``module`` that ``key_of``
    names. ``module`` may be abstract (``nnx.eval_shape``): nothing is allocated."""
    return {key: _torch_shape(path, variable.get_value().shape)
            for path, variable, key in _torch_variables(module, key_of)}


def torchvision_shapes(target: nnx.Module) -> dict[str, tuple[int, ...]]:
    """The torchvision state-dict key -> shape (PyTorch layout, OIHW kernels) that ``target``'s backbone expects.

    ``target`` may be abstract (``nnx.eval_shape(lambda: resnet50(nnx.Rngs(0)))``), so checking a file against
    ResNet-50 allocates nothing.
    """
    return torch_shapes(_backbone_of(target), torchvision_key)


def assign_torch_arrays(module: nnx.Module, arrays: dict[str, np.ndarray],
                        key_of: Callable[[tuple], str | None]) -> set[str]:
    """Sets every variable of ``module`` that ``key_of`` names from ``arrays[key]`` (PyTorch layout: convolution
    kernels OIHW are transposed to HWIO, dense ones (out, in) to (in, out)), cast to the variable's dtype, and returns
    the keys used.

    Raises:
        KeyError: if a named key is missing from ``arrays``.
        ValueError: if an array's shape is not its variable's (named); nothing is assigned then.
    """
    updated, used = [], set()
    for path, variable, key in _torch_variables(module, key_of):
        value = _relayout(path, arrays[key], _FLAX_FROM_TORCH)
        if value.shape != variable.get_value().shape:
            raise ValueError(f"{key}: shape {_torch_shape(path, value.shape)} in PyTorch layout, but the variable "
                             f"{'/'.join(map(str, path))} needs {_torch_shape(path, variable.get_value().shape)}")
        updated.append((path, variable.replace(jnp.asarray(value, dtype=variable.get_value().dtype))))
        used.add(key)
    nnx.update(module, nnx.from_flat_state(updated))
    return used


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read with numpy (no pickles).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        IsADirectoryError: if it is a folder.
        ValueError: if it is not a readable ``.npz`` archive.
    """
    path = Path(path)
    _require_file(path, "weights file")
    not_npz = f"{path} is not a readable .npz archive"
    with open(path, "rb") as handle:
        # Checked first: np.load would return a plain .npy file's array, and call anything else pickled data.
        if not zipfile.is_zipfile(handle):
            raise ValueError(f"{not_npz} (not a zip file of .npy arrays, as numpy.savez and the converters write)")
        try:
            with zipfile.ZipFile(handle) as archive:
                from_torch = any(name.endswith("data.pkl") for name in archive.namelist())  # torch.save's zip format
            if not from_torch:
                handle.seek(0)
                with np.load(handle, allow_pickle=False) as archive:
                    arrays = {key: archive[key] for key in archive.files}
                # np.load hands a member that is not a .npy array over as its raw bytes (worded below, as the
                # other reasons a file is no .npz).
                not_arrays = [key for key, value in arrays.items() if not isinstance(value, np.ndarray)]
                if not_arrays:
                    raise ValueError(f"member {not_arrays[0]!r} is not a .npy array")
                return arrays
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
            raise ValueError(f"{not_npz} ({error})") from None
    raise ValueError(f"{path} is a PyTorch checkpoint, not an .npz: convert it first (python -m deep.weights convert, "
                     f"or python -m deep.perceptual convert for LPIPS)")


def check_state_arrays(expected: dict[str, tuple[int, ...]], arrays: dict[str, np.ndarray], source: str,
                       network: str, is_ignored: Callable[[str], bool] = lambda key: False,
                       ignored: str = "") -> None:
    """Raises a one-line ``ValueError`` naming the first offending key unless ``arrays`` holds exactly the keys
    of ``expected`` (plus keys for which ``is_ignored`` holds) with those shapes and floating dtypes.

    Args:
        expected: state-dict key -> shape in PyTorch's layout.
        arrays: what a file holds.
        source: where ``arrays`` came from (starts the message).
        network: what ``expected`` describes, for the message (``"backbone"``, ``"LPIPS network"``).
        is_ignored: keys a file may hold besides ``expected``'s, skipped.
        ignored: those keys in words, for the message.
    """
    unexpected = [key for key in arrays if key not in expected and not is_ignored(key)]
    for key, shape in expected.items():
        if key not in arrays:
            hint = (f" ({len(unexpected)} unexpected keys there, first {unexpected[0]!r}: a prefix such as "
                    "'module.' or 'encoder.' must be stripped)" if unexpected else "")
            raise ValueError(f"{source}: missing {network} key {key!r} (shape {shape}){hint}")
        actual = tuple(arrays[key].shape)
        if actual != shape:
            raise ValueError(f"{source}: key {key!r} has shape {actual}, expected {shape} (PyTorch layout)")
        if not np.issubdtype(arrays[key].dtype, np.floating):
            raise ValueError(f"{source}: key {key!r} has dtype {arrays[key].dtype}, expected a floating type")
    if unexpected:
        allowed = f" (allowed besides the {network}'s: {ignored})" if ignored else ""
        raise ValueError(f"{source}: {len(unexpected)} key(s) the {network} does not have, first "
                         f"{unexpected[0]!r}{allowed}")


def check_torchvision_arrays(target: nnx.Module, arrays: dict[str, np.ndarray], source: str = "weights") -> None:
    """Raises a one-line ``ValueError`` unless ``arrays`` holds exactly the backbone's keys (plus ignored ones)
    with the expected PyTorch-layout shapes and floating dtypes."""
    check_state_arrays(torchvision_shapes(target), arrays, source, "backbone", is_ignored_key,
                       "fc.* and *.num_batches_tracked")


def load_torchvision_npz(target: nnx.Module, path: str | os.PathLike) -> None:
    """Loads torchvision ResNet weights from ``path`` into ``target``'s backbone, in place.

    Every key and shape is checked before anything is assigned, so a rejected file leaves the model unchanged.
    Values are cast to the variables' dtype (float32).

    Args:
        target: a :class:`deep.backbone.ResNet` or a model whose ``.backbone`` is one.
        path: an ``.npz`` with torchvision state-dict keys and PyTorch layouts (see :func:`convert_pth_to_npz`).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: on an unreadable file, a missing or misshapen backbone key, a non-floating array, or a key
            that is neither the backbone's nor ignored (``fc.*``, ``*.num_batches_tracked``); the message names it.
    """
    backbone = _backbone_of(target)
    arrays = read_npz(path)
    check_torchvision_arrays(backbone, arrays, source=f"weights file {path}")
    assign_torch_arrays(backbone, arrays, torchvision_key)


def check_npz(path: str | os.PathLike, target: nnx.Module | None = None) -> int:
    """Checks an ``.npz`` against ``target``'s backbone (default: an abstract ResNet-50 at output stride 8, built
    with ``nnx.eval_shape`` so nothing is allocated) without loading it; returns the number of backbone arrays.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_torchvision_npz`.
    """
    if target is None:
        target = nnx.eval_shape(lambda: resnet50(nnx.Rngs(0)))
    check_torchvision_arrays(target, read_npz(path), source=f"weights file {path}")
    return len(torchvision_shapes(target))


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], compressed: bool = False) -> None:
    """Writes ``arrays`` as an ``.npz`` at ``path``, atomically (:func:`deep.files.write_atomically`). The name is
    kept as given: NumPy appends ``.npz`` to a file name without it, not to an open file."""
    save = np.savez_compressed if compressed else np.savez

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as file:
            save(file, **arrays)

    write_atomically(Path(path), write)


def save_torchvision_npz(target: nnx.Module, path: str | os.PathLike) -> None:
    """Writes ``target``'s backbone as an ``.npz`` with torchvision keys and PyTorch layouts (OIHW kernels),
    atomically; :func:`load_torchvision_npz` reads it back. No ``num_batches_tracked`` or ``fc.*`` is written (load
    it into a torchvision ResNet with ``strict=False``). A missing folder is created.
    """
    arrays = {}
    for variable_path, variable, key in _torch_variables(_backbone_of(target), torchvision_key):
        value = np.asarray(jax.device_get(variable.get_value()))
        arrays[key] = _relayout(variable_path, value, _TORCH_FROM_FLAX)
    write_npz(path, arrays)


def _require_file(path: Path, kind: str) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{kind} {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {path} does not exist")


def read_pth_state_dict(pth_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state dict as numpy arrays, keys and layouts as they are; a checkpoint holding
    the state dict under ``"state_dict"`` is unwrapped. PyTorch is imported here only, and the file is read
    with ``torch.load(weights_only=True)``: no code in it runs.

    Raises:
        ImportError: if PyTorch is not installed.
        FileNotFoundError: if ``pth_path`` does not exist.
        IsADirectoryError: if it is a folder.
        ValueError: if the file is not a state dict of tensors.
    """
    pth_path = Path(pth_path)
    _require_file(pth_path, "PyTorch file")  # first: a wrong path is said as such, with PyTorch or without
    try:
        import torch
    except ImportError:
        raise ImportError(f"converting a .pth file needs PyTorch, which is not installed: "
                          f"pip install '{DISTRIBUTION}[torch]'") from None
    try:
        state = torch.load(pth_path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not a state dict
        raise ValueError(f"{pth_path} could not be read as a PyTorch state dict ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{pth_path} does not hold a state dict (a mapping of names to tensors)")
    arrays = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{pth_path}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32, torch.float64):
            tensor = tensor.float()  # bfloat16 and friends have no numpy dtype
        arrays[str(key)] = tensor.numpy()
    return arrays


def convert_pth_to_npz(pth_path: str | os.PathLike, npz_path: str | os.PathLike) -> int:
    """Converts a PyTorch state dict (e.g. torchvision's ``resnet50-19c8e357.pth``) to an ``.npz``, atomically.

    Keys and layouts are kept as they are (the loader transposes); see :func:`read_pth_state_dict`.

    Returns:
        The number of arrays written.

    Raises:
        ImportError: if PyTorch is not installed.
        FileNotFoundError: if ``pth_path`` does not exist.
        IsADirectoryError: if it is a folder.
        ValueError: if the file is not a state dict of tensors.
    """
    arrays = read_pth_state_dict(pth_path)
    write_npz(npz_path, arrays)
    return len(arrays)


RESNETS = {"50": resnet50, "18": resnet18}  # the backbones `check` knows, by depth


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deep.weights convert IN.pth OUT.npz`` or ``check IN.npz``: one-line errors, exit status 2 on bad
    input."""
    parser = OneLineArgumentParser(prog="python -m deep.weights",
                                   description="Offline conversion of torchvision weights for the Flax backbone.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert a PyTorch state dict (.pth) to .npz (needs torch)")
    convert.add_argument("pth", type=Path, help="input .pth (e.g. resnet50-19c8e357.pth)")
    convert.add_argument("npz", type=Path, help="output .npz")
    check = commands.add_parser("check", help="check an .npz against a backbone (no torch needed)")
    check.add_argument("npz", type=Path, help="the .npz to check")
    check.add_argument("--resnet", choices=sorted(RESNETS), default="50",
                       help="the backbone: 50 (the dense model's) or 18 (the CelebA model's)")
    arguments = parser.parse_args(argv)

    def command() -> str:
        if arguments.command == "convert":
            return f"wrote {convert_pth_to_npz(arguments.pth, arguments.npz)} arrays to {arguments.npz}"
        build = RESNETS[arguments.resnet]
        count = check_npz(arguments.npz, nnx.eval_shape(lambda: build(nnx.Rngs(0))))
        return f"{arguments.npz}: all {count} ResNet-{arguments.resnet} backbone arrays present with the right shapes"

    return run_command(parser.prog, command)


if __name__ == "__main__":
    sys.exit(main())
