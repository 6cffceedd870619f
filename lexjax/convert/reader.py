"""Reading a Hugging Face checkpoint directory one tensor at a time, without PyTorch.

A directory written by `save_pretrained` holds `config.json` and the weights: one
`model.safetensors`, or shards listed by `model.safetensors.index.json` (`weight_map`: tensor
name -> file); older checkpoints hold `pytorch_model.bin` (or its shards and
`pytorch_model.bin.index.json`), which only PyTorch can read.

Safetensors files are read from their documented layout (an 8-byte little-endian header size, a
JSON header giving each tensor's dtype, shape and byte range, then the raw data) through
`numpy.memmap`: a tensor's bytes are read when it is asked for, so converting a checkpoint
larger than host memory holds one tensor at a time. bfloat16 tensors are read as `ml_dtypes`'
bfloat16 (numpy has none) and widened to float32.
"""
from __future__ import annotations

import json
import os
import struct
import ml_dtypes
import numpy as np

from lexjax.errors import UserError


class CheckpointFormatError(UserError, ValueError):
    """A checkpoint directory that cannot be read: missing files, shards or tensors."""


SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """`(header, data_offset)` of a safetensors file: header maps tensor names to
    `{"dtype", "shape", "data_offsets"}` (offsets relative to `data_offset`)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise CheckpointFormatError(f"{path} is not a safetensors file (it is too short)")
        (size,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointFormatError(f"{path} is not a safetensors file (unreadable header)")
    header.pop("__metadata__", None)
    return header, 8 + size


class CheckpointReader:
    """The tensors of a checkpoint directory, by their Hugging Face names.

    `reader.names()` lists them; `reader.get(name)` reads one as a float32 numpy array
    (integer and bool tensors keep their dtype).
    """

    def __init__(self, directory: str):
        self.directory = directory
        self._headers: dict[str, tuple[dict, int]] = {}
        self._torch_state: dict[str, dict] = {}
        self._files = self._tensor_files()

    def _tensor_files(self) -> dict[str, str]:
        """Tensor name -> the file that holds it (checked to exist)."""
        d = self.directory
        for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE),
                                   (TORCH_INDEX, TORCH_SINGLE)):
            index = os.path.join(d, index_name)
            if os.path.isfile(index):
                with open(index) as f:
                    weight_map = json.load(f).get("weight_map", {})
                files = {name: os.path.join(d, file) for name, file in weight_map.items()}
                for path in sorted(set(files.values())):
                    if not os.path.isfile(path):
                        raise CheckpointFormatError(
                            f"shard {os.path.basename(path)} listed in {index} is missing from "
                            f"{d}; copy every shard the index names")
                return files
            path = os.path.join(d, single)
            if os.path.isfile(path):
                names = (read_safetensors_header(path)[0] if single == SAFETENSORS_SINGLE
                         else self._torch(path))
                return {name: path for name in names}
        raise CheckpointFormatError(
            f"{d} holds no weights: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} with its "
            f"shards, or {TORCH_SINGLE} (save the model with save_pretrained)")

    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> np.ndarray:
        """The tensor `name`, floats widened to float32."""
        if name not in self._files:
            raise CheckpointFormatError(
                f"tensor {name!r} is not in the checkpoint {self.directory}")
        path = self._files[name]
        array = (self._safetensor(path, name) if path.endswith(".safetensors")
                 else self._torch(path)[name])
        if np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16:
            return np.asarray(array, np.float32)
        return np.asarray(array)

    def _safetensor(self, path: str, name: str) -> np.ndarray:
        if path not in self._headers:
            self._headers[path] = read_safetensors_header(path)
        header, offset = self._headers[path]
        entry = header[name]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointFormatError(f"tensor {name} in {path} has unsupported dtype "
                                        f"{entry['dtype']}")
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise CheckpointFormatError(f"tensor {name} in {path}: its byte range does not match "
                                        f"its shape {shape} (a truncated or damaged file)")
        if offset + end > os.path.getsize(path):
            raise CheckpointFormatError(f"{path} ends before tensor {name}: the file is "
                                        "truncated; copy it again")
        return np.memmap(path, dtype=dtype, mode="r", offset=offset + start, shape=shape)

    def _torch(self, path: str) -> dict:
        """A PyTorch `.bin` state dict (memory-mapped), as numpy arrays; needs torch."""
        if path not in self._torch_state:
            try:
                import torch
            except ImportError:
                raise CheckpointFormatError(
                    f"{path} is a PyTorch checkpoint, which needs torch to read: pip install -e "
                    "'.[convert]', or re-save the model with save_pretrained("
                    "safe_serialization=True)") from None
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            self._torch_state[path] = {
                k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
                for k, v in state.items()}
        return self._torch_state[path]
