"""Read the refusal-token contract back from a GGUF's metadata (or find the tokens in its vocab)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtlocal.constants import (
    COCONOT_CATEGORIES,
    DEFAULT_THRESHOLD,
    RESPOND_TOKEN,
    SINGLE_CATEGORY,
    Keys,
    TokenMode,
    token_for,
)
from rtlocal.errors import RtlocalError


@dataclass
class RefusalInfo:
    """Which tokens open an answer in this model, and what they mean."""

    present: bool = False
    source: str = "none"  # "metadata", "vocab" or "none"
    mode: str = ""
    respond_token: str = RESPOND_TOKEN
    respond_id: int | None = None
    categories: list[str] = field(default_factory=list)
    category_tokens: list[str] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    calibration: dict | None = None

    @property
    def start_ids(self) -> set[int]:
        ids = set(self.category_ids)
        if self.respond_id is not None:
            ids.add(self.respond_id)
        return ids

    def token_for(self, category: str | None) -> int:
        return self.category_ids[self.categories.index(category)]

    def category_of(self, token: int) -> str | None:
        try:
            return self.categories[self.category_ids.index(token)]
        except ValueError:
            return None


def _json(metadata: Mapping[str, Any], key: str) -> Any:
    value = metadata[key]
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise RtlocalError(f"malformed GGUF metadata {key}: {e}") from e


def read_refusal_info(
    metadata: Mapping[str, Any], token_id: Callable[[str], int | None], *, n_vocab: int | None = None
) -> RefusalInfo:
    """From rtlocal.* keys when present; else by looking the paper's token strings up in the vocab.

    The contract is checked here, when the model loads, not when a value is first used: token ids
    inside the vocabulary (`n_vocab`) and distinct, thresholds in [0,1], a well-formed calibration table.
    """
    info = _read_refusal_info(metadata, token_id)
    if info.present:
        check_contract(info, n_vocab)
    return info


def check_contract(info: RefusalInfo, n_vocab: int | None) -> None:
    """RtlocalError naming the GGUF key when the refusal metadata cannot be right."""
    from rtlocal.runtime.calibration import validate

    key = Keys.CATEGORIES if info.source == "metadata" else "tokenizer.ggml.tokens"
    if not info.categories:
        raise RtlocalError(f"malformed GGUF metadata {key}: no refusal categories")
    if len(set(info.categories)) != len(info.categories):
        raise RtlocalError(f"malformed GGUF metadata {key}: a category is listed twice ({', '.join(info.categories)})")
    ids = [*info.category_ids, *([info.respond_id] if info.respond_id is not None else [])]
    for name, tid in [*zip(info.categories, info.category_ids), ("respond", info.respond_id)]:
        if tid is None:
            continue
        if tid < 0 or (n_vocab is not None and tid >= n_vocab):
            raise RtlocalError(f"malformed GGUF metadata {key}: the token id {tid} of {name!r} is outside the vocabulary ({n_vocab} tokens)")
    if len(set(ids)) != len(ids):
        raise RtlocalError(f"malformed GGUF metadata {key}: two answer-start tokens share an id ({ids})")
    for name, t in info.thresholds.items():
        if not (math.isfinite(t) and 0.0 <= t <= 1.0):
            raise RtlocalError(f"malformed GGUF metadata {key}: the threshold of {name!r} is {t}, not in [0,1]")
    if info.calibration is not None:
        try:
            validate(info.calibration, categories=info.categories)
        except RtlocalError as e:
            raise RtlocalError(f"malformed GGUF metadata {Keys.CALIBRATION}: {e}") from None


def _read_refusal_info(metadata: Mapping[str, Any], token_id: Callable[[str], int | None]) -> RefusalInfo:
    if Keys.CATEGORIES in metadata:
        entries = _json(metadata, Keys.CATEGORIES)
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise RtlocalError(f"malformed GGUF metadata {Keys.CATEGORIES}: expected a JSON list of objects")
        try:
            cats = [str(e["name"]) for e in entries]
            toks = [str(e.get("token") or token_for(e["name"])) for e in entries]
            ids = [int(e["id"]) for e in entries]
            ths = [float(e.get("threshold", DEFAULT_THRESHOLD)) for e in entries]
        except (TypeError, KeyError, ValueError) as e:
            raise RtlocalError(f"malformed GGUF metadata {Keys.CATEGORIES}: {e!r}") from e
        respond = str(metadata.get(Keys.RESPOND_TOKEN, RESPOND_TOKEN))
        rid = metadata.get(Keys.RESPOND_TOKEN_ID)
        try:
            rid = int(rid) if rid is not None else None
        except (TypeError, ValueError):
            raise RtlocalError(f"malformed GGUF metadata {Keys.RESPOND_TOKEN_ID}: {rid!r} is not a token id") from None
        return RefusalInfo(
            present=True,
            source="metadata",
            mode=str(metadata.get(Keys.MODE, TokenMode.CATEGORICAL.value)),
            respond_token=respond,
            respond_id=rid if rid is not None else token_id(respond),
            categories=cats,
            category_tokens=toks,
            category_ids=ids,
            thresholds=dict(zip(cats, ths)),
            calibration=_json(metadata, Keys.CALIBRATION) if Keys.CALIBRATION in metadata else None,
        )
    respond_id = token_id(RESPOND_TOKEN)
    if respond_id is None:
        return RefusalInfo()
    found = [(c, token_for(c), token_id(token_for(c))) for c in [*COCONOT_CATEGORIES, SINGLE_CATEGORY]]
    found = [(c, t, i) for c, t, i in found if i is not None]
    if not found:
        return RefusalInfo()
    cats = [c for c, _, _ in found]
    mode = TokenMode.SINGLE if cats == [SINGLE_CATEGORY] else TokenMode.CATEGORICAL if len(cats) == 5 else TokenMode.CUSTOM
    return RefusalInfo(
        present=True,
        source="vocab",
        mode=mode.value,
        respond_id=respond_id,
        categories=cats,
        category_tokens=[t for _, t, _ in found],
        category_ids=[i for _, _, i in found],
        thresholds={c: DEFAULT_THRESHOLD for c in cats},
    )


# GGUF value types (gguf-py's GGUFValueType) -> struct format of fixed-size scalars.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def scan_header(path: str | Path, wanted: set[str]) -> dict[str, Any]:
    """Scalar/string metadata values for `wanted` keys, read from the GGUF header without loading it.

    Arrays (the vocabulary) are skipped, not parsed: a few milliseconds instead of gguf-py's seconds.
    """
    import struct

    out: dict[str, Any] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise RtlocalError(f"{path}: not a GGUF file")

        def read(fmt: str):
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise RtlocalError(f"{path}: truncated GGUF header")
            return struct.unpack(fmt, data)[0]

        def string() -> bytes:
            return f.read(read("<Q"))

        def skip(vtype: int) -> None:
            if vtype == _STRING:
                f.seek(read("<Q"), 1)
            elif vtype == _ARRAY:
                itype, n = read("<I"), read("<Q")
                if itype in _SCALARS:
                    f.seek(n * struct.calcsize(_SCALARS[itype]), 1)
                else:
                    for _ in range(n):
                        skip(itype)
            elif vtype in _SCALARS:
                f.seek(struct.calcsize(_SCALARS[vtype]), 1)
            else:
                raise RtlocalError(f"{path}: unknown GGUF value type {vtype}")

        read("<I")  # version
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key = string().decode("utf-8", "replace")
            vtype = read("<I")
            if key in wanted and vtype == _STRING:
                out[key] = string().decode("utf-8", "replace")
            elif key in wanted and vtype in _SCALARS:
                out[key] = read(_SCALARS[vtype])
            else:
                skip(vtype)
            if len(out) == len(wanted):
                break
    return out
