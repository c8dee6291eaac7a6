"""NVIDIA's network pickles read as plain data, without NVIDIA's code and without running anything in the file.

A stylegan2-ada-pytorch snapshot (``network-snapshot-*.pkl``; its published pretrained models too) is a pickle
of a dict ``{G, D, G_ema, augment_pipe, training_set_kwargs}``. Each network is stored through NVIDIA's
``torch_utils.persistence``: a call ``_reconstruct_persistent_obj(meta)`` whose ``meta`` holds the source code
of the module that defined the class (``module_src``), the class name, a format version and the object's state
(a ``torch.nn.Module``'s ``__dict__``: ``_parameters``, ``_buffers``, ``_modules``, plain attributes, and the
``_init_args``/``_init_kwargs`` it was built with). NVIDIA's loader executes ``module_src``; here ``meta``
becomes a :class:`PersistentObject`, plain data, and the source stays text.

Tensors are pickled by torch as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``
(parameters wrapped in ``_rebuild_parameter``), and each storage as ``torch.storage._load_from_bytes(b)``,
where ``b`` is a legacy ``torch.save`` stream: five pickles (magic number, protocol version, system info, the
storage as a persistent id ``('storage', torch.FloatStorage, key, location, numel, None)``, the list of keys),
then per key an int64 element count and the raw little-endian bytes.

Both levels are read by restricted unpicklers that resolve only the names in ``ALLOWED`` and
``STORAGE_TYPES``, each to a stand-in written here (never the named object itself). Any other name - an
``os.system`` reduce, ``builtins.eval``, an unknown class - is refused with a message naming it.
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy torch.save stream
LEGACY_PROTOCOL = 1001


class NetworkPickleError(ValueError):
    """A file styleray cannot read as a network pickle; the message names the file, the reason and the fix."""


@dataclass
class PersistentObject:
    """One object NVIDIA stored through ``torch_utils.persistence``: its class name and state, as data."""

    class_name: str
    version: int
    state: dict[str, Any]  # the module's __dict__
    module_src: str = field(repr=False, default="")  # the defining module's source, kept as text: never run

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return dict(self.state.get("_init_kwargs") or {})

    @property
    def init_args(self) -> tuple:
        return tuple(self.state.get("_init_args") or ())

    def attr(self, name: str, default: Any = None) -> Any:
        return self.state.get(name, default)

    def children(self) -> dict[str, Any]:
        """Submodules by name (``None`` where NVIDIA set one to None)."""
        return dict(self.state.get("_modules") or {})

    def own_tensors(self) -> dict[str, torch.Tensor]:
        """This object's parameters and buffers (None entries, e.g. a layer without bias, left out)."""
        found = {}
        for group in ("_parameters", "_buffers"):
            for name, value in (self.state.get(group) or {}).items():
                if value is not None:
                    found[name] = value
        return found

    def walk(self, prefix: str = "") -> Iterator[tuple[str, "PersistentObject"]]:
        """(dotted path, object) for this object and every persistent submodule, depth first."""
        yield prefix, self
        for name, child in self.children().items():
            if isinstance(child, PersistentObject):
                yield from child.walk(f"{prefix}.{name}" if prefix else name)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer under this object, named as ``state_dict()`` names them."""
        out = {}
        for path, obj in self.walk():
            for name, tensor in obj.own_tensors().items():
                out[f"{path}.{name}" if path else name] = tensor
        return out


# ---------------------------------------------------------------------------------------------------------
# Stand-ins for the names a network pickle may use
# ---------------------------------------------------------------------------------------------------------


class _EasyDict(dict):
    """dnnlib.util.EasyDict (a dict with attribute access) as a plain dict."""


class _Storage:
    """A storage read from its legacy bytes: a flat tensor of its dtype."""

    def __init__(self, flat: torch.Tensor):
        self.flat = flat


def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise NetworkPickleError(f"a persistent object with unexpected metadata {sorted(meta) if isinstance(meta, dict) else type(meta).__name__}")
    state, name, src = meta.get("state"), meta.get("class_name"), meta.get("module_src", "")
    if not isinstance(name, str) or not isinstance(state, dict) or not isinstance(src, str):
        raise NetworkPickleError(f"persistent object {name!r}: class_name, module_src or state of the wrong type")
    return PersistentObject(class_name=name, version=int(meta.get("version", 0)), state=dict(state), module_src=src)


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise NetworkPickleError(f"tensor {what} {value!r} is not a tuple of non-negative integers")
    return tuple(value)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2, checked: the view must lie inside its storage."""
    if not isinstance(storage, _Storage) or not isinstance(offset, int) or offset < 0:
        raise NetworkPickleError("a tensor whose storage or offset is not what torch writes")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise NetworkPickleError(f"tensor size {size} and stride {stride} differ in length")
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.flat.numel():
            raise NetworkPickleError(f"a tensor of size {size} reaches past its storage of {storage.flat.numel()} elements")
    return torch.as_strided(storage.flat, size, stride, offset).clone()


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None):
    """torch._utils._rebuild_parameter(_with_state): the plain tensor (hooks and Python state dropped)."""
    if not isinstance(data, torch.Tensor):
        raise NetworkPickleError("a parameter without tensor data")
    return data


class _DType:
    """numpy.dtype(code, align, copy) + its byte order (BUILD state); numeric and bool types only."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True):
        if not isinstance(code, str):
            raise NetworkPickleError(f"numpy dtype {code!r} is not a type code")
        try:
            dtype = np.dtype(code)
        except TypeError:
            raise NetworkPickleError(f"numpy dtype {code!r} is unknown") from None
        if dtype.kind not in "biufc":
            raise NetworkPickleError(f"numpy dtype {code!r} is not numeric (object arrays are never read)")
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, _DType) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise NetworkPickleError("a numpy scalar that is not a numeric value")
    return np.frombuffer(data, dtype=dtype.dtype)[0]


class _NdarrayBuilder:
    """numpy.core.multiarray._reconstruct(ndarray, ...) + BUILD state (version, shape, dtype, fortran, bytes)."""

    def __init__(self, cls: Any = None, shape: Any = None, dtype_code: Any = None):
        if cls is not _NDARRAY:
            raise NetworkPickleError("numpy _reconstruct of something other than an ndarray")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _DType)
                and isinstance(state[4], bytes)):
            raise NetworkPickleError("a numpy array that is not a plain numeric array")
        _, shape, dtype, fortran, raw = state
        shape = _ints(shape, "shape")
        array = np.frombuffer(raw, dtype=dtype.dtype)
        if array.size != int(np.prod(shape)):
            raise NetworkPickleError(f"a numpy array of shape {shape} with {array.size} values")
        self.array = array.reshape(shape, order="F" if fortran else "C").copy()


_NDARRAY = object()  # numpy.ndarray, only as _reconstruct's first argument


def _load_from_bytes(blob: Any) -> _Storage:
    if not isinstance(blob, bytes):
        raise NetworkPickleError("a storage without bytes")
    return _Storage(read_legacy_storage(blob))


ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("numpy", "dtype"): _DType,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _NdarrayBuilder,
    ("numpy._core.multiarray", "_reconstruct"): _NdarrayBuilder,
}

STORAGE_TYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}

TF_HINT = (
    "a TensorFlow-era pickle ({name}, from StyleGAN2 or StyleGAN2-ADA in TensorFlow): convert it first with "
    "NVIDIA's stylegan2-ada-pytorch (python legacy.py --source=FILE.pkl --dest=FILE-pytorch.pkl), then import "
    "the converted file"
)


class _Unpickler(pickle.Unpickler):
    """The outer pickle: only the names in ALLOWED, each resolved to its stand-in."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("dnnlib.tflib"):
            raise NetworkPickleError(TF_HINT.format(name=f"{module}.{name}"))
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise NetworkPickleError(
                f"refused: the pickle asks for {module}.{name}, which a network pickle never needs (only tensors, "
                "containers, numbers and NVIDIA's persistent objects are read; nothing in the file is run)"
            ) from None


@dataclass(frozen=True)
class _StorageRef:
    dtype: torch.dtype
    key: str
    numel: int


class _StorageUnpickler(pickle.Unpickler):
    """One pickle of a legacy torch.save stream: storage types only; storages arrive as persistent ids."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_TYPES:
            return STORAGE_TYPES[name]
        raise NetworkPickleError(f"refused: a tensor storage asks for {module}.{name}, which is not a storage type")

    def persistent_load(self, pid: Any) -> _StorageRef:
        ok = (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
              and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0 and (len(pid) == 5 or pid[5] is None))
        if not ok:
            raise NetworkPickleError(f"a tensor storage with an unexpected reference {pid!r:.80}")
        return _StorageRef(dtype=pid[1], key=pid[2], numel=pid[4])


def read_legacy_storage(blob: bytes) -> torch.Tensor:
    """The flat tensor of one storage saved by torch's legacy (non-zip) ``torch.save``."""
    f = io.BytesIO(blob)
    if _StorageUnpickler(f).load() != LEGACY_MAGIC or _StorageUnpickler(f).load() != LEGACY_PROTOCOL:
        raise NetworkPickleError("a tensor storage that is not in torch's legacy format")
    info = _StorageUnpickler(f).load()
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise NetworkPickleError("a tensor storage written on a big-endian machine (not supported)")
    ref = _StorageUnpickler(f).load()
    keys = _StorageUnpickler(f).load()
    if not isinstance(ref, _StorageRef) or keys != [ref.key]:
        raise NetworkPickleError("a tensor storage stream with other content than one storage")
    count = int.from_bytes(f.read(8), "little")
    itemsize = torch.empty(0, dtype=ref.dtype).element_size()
    raw = f.read(count * itemsize)
    if count != ref.numel or len(raw) != count * itemsize:
        raise NetworkPickleError(f"a tensor storage of {ref.numel} elements holds {len(raw) // itemsize}: truncated")
    if count == 0:
        return torch.empty(0, dtype=ref.dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(ref.dtype)


# ---------------------------------------------------------------------------------------------------------
# Reading a file
# ---------------------------------------------------------------------------------------------------------


def read_network_pickle(data: bytes, source: str = "the file") -> Any:
    """The content of a network pickle as plain data: dicts, lists, tensors, numbers, numpy values and
    :class:`PersistentObject` trees. NetworkPickleError naming ``source`` for anything else."""
    _check_header(data, source)
    try:
        content = _Unpickler(io.BytesIO(data)).load()
    except NetworkPickleError as e:
        raise NetworkPickleError(f"{source}: {e}") from None
    except RecursionError:
        raise NetworkPickleError(f"{source}: nested too deeply to be a network pickle") from None
    except Exception as e:  # noqa: BLE001 - any other failure while decoding untrusted bytes means a bad file
        raise NetworkPickleError(f"{source}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None
    return _finish_arrays(content)


def _check_header(data: bytes, source: str) -> None:
    if not data:
        raise NetworkPickleError(f"{source} is empty")
    if data[:2] == b"PK":
        raise NetworkPickleError(f"{source} is a zip archive (a torch.save checkpoint or a dataset?), not a network "
                                 "pickle (network-snapshot-*.pkl)")
    if data[0] != pickle.PROTO[0]:
        raise NetworkPickleError(f"{source} is not a pickle (it does not start with a pickle protocol header)")


def _finish_arrays(value: Any) -> Any:
    """numpy arrays were built in place (BUILD): swap each builder for its array, through every container."""
    walk: Callable[[Any], Any] = _finish_arrays
    if isinstance(value, _NdarrayBuilder):
        if value.array is None:
            raise NetworkPickleError("a numpy array without data")
        return value.array
    if isinstance(value, PersistentObject):
        value.state = walk(value.state)
    elif isinstance(value, dict):
        for k in list(value):
            value[k] = walk(value[k])
    elif isinstance(value, list):
        value[:] = [walk(v) for v in value]
    elif isinstance(value, tuple):
        return tuple(walk(v) for v in value)
    return value
