"""A DCP reader that refuses code in a checkpoint's `.metadata`.

torch's FileSystemReader unpickles `.metadata` with plain `pickle.load`, so a tampered checkpoint
would run code on eval, score, --resume or --init-from. This reader unpickles only the classes DCP
metadata is made of (the metadata dataclasses, torch.Size, dtypes, layouts, paths, storage info);
anything else is a ValueError naming the file. Importing `pickle` here is the point: to restrict it.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = (module == "torch.distributed.checkpoint.metadata" or (module, name) in _ALLOWED
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, AttributeError, EOFError, ImportError) as err:
                raise ValueError(f"{path}: refused checkpoint metadata ({err})") from None
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path}: not DCP checkpoint metadata")
        storage = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage.load_id = self.load_id
        metadata.storage_meta = storage
        return metadata
