"""Rewrite a GGUF with some metadata keys set: every other key and every tensor copied byte for byte.

The new file is written beside the target under a temporary name and renamed over it, so a reader
(or a crash) never sees half a model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from rtlocal.errors import RtlocalError
from rtlocal.paths import discard, temp_path_for

log = logging.getLogger(__name__)

MetadataValue = str | int | float | bool


def _value_type(value: MetadataValue):
    import gguf

    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        return gguf.GGUFValueType.UINT32 if value >= 0 else gguf.GGUFValueType.INT32
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    raise RtlocalError(f"cannot write metadata of type {type(value).__name__}")


def set_metadata(path: str | Path, values: Mapping[str, MetadataValue], *, out: str | Path | None = None) -> Path:
    """Copy the GGUF at `path` to `out` (default: `path` itself) with `values` set; returns the written path.

    Existing keys keep their position and value type; new keys are added after them.
    """
    import gguf

    src = Path(path).expanduser()
    dst = Path(out).expanduser() if out is not None else src
    if not src.is_file():
        raise RtlocalError(f"{path}: no such file")
    if not dst.parent.is_dir():
        raise RtlocalError(f"cannot write {dst}: directory {dst.parent} does not exist")
    try:
        reader = gguf.GGUFReader(str(src), "r")
    except (ValueError, OSError, IndexError) as e:
        raise RtlocalError(f"{path}: cannot read GGUF ({e})") from e
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch is None:
        raise RtlocalError(f"{path}: GGUF has no {gguf.Keys.General.ARCHITECTURE}")
    tmp = temp_path_for(dst)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch=arch.contents(), endianess=reader.endianess)
        alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = alignment.contents()
        pending = dict(values)
        for field in reader.fields.values():
            # the architecture is written by GGUFWriter itself; GGUF.* are the reader's virtual fields
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            if field.name in pending:
                new = pending.pop(field.name)
                new_type = vtype if vtype != gguf.GGUFValueType.ARRAY else _value_type(new)
                writer.add_key_value(field.name, new, new_type)
            else:
                writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
        for key, value in pending.items():
            writer.add_key_value(key, value, _value_type(value))
        for tensor in reader.tensors:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
        writer.close()
        del reader  # release the memory map of the source before it is replaced
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        log.info("wrote %s (%d metadata keys set)", dst, len(values))
        return dst
    except OSError as e:
        raise RtlocalError(f"cannot write {dst}: {e.strerror or e}") from e
    finally:
        discard(tmp)
