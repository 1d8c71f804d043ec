"""`rtlocal inspect`: what a GGUF holds, read with gguf-py (no model load)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rtlocal.constants import STRICTNESS_PRESETS, Keys, TokenType
from rtlocal.errors import RtlocalError
from rtlocal.runtime.metadata import read_refusal_info

TEMPLATE_HEAD = 400


def _file_type_name(value: int | None) -> str:
    import gguf

    if value is None:
        return "unknown"
    try:
        return gguf.LlamaFileType(value).name.replace("MOSTLY_", "").replace("ALL_", "").lower()
    except ValueError:
        return str(value)


def inspect_gguf(path: str | Path) -> dict[str, Any]:
    """A JSON-ready summary: architecture, size, parameters, refusal tokens, rtlocal metadata."""
    import gguf

    p = Path(path).expanduser()
    if not p.is_file():
        raise RtlocalError(f"{path}: no such file")
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise RtlocalError(f"{path}: not a GGUF file")
    try:
        reader = gguf.GGUFReader(str(p))
    except (ValueError, OSError, IndexError) as e:
        raise RtlocalError(f"{path}: corrupt GGUF ({e})") from e

    def get(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    arch = get("general.architecture", "unknown")
    tokens = get("tokenizer.ggml.tokens", []) or []
    types = get("tokenizer.ggml.token_type", []) or []
    rt = {k: get(k) for k in reader.fields if k.startswith("rtlocal.")}
    info = read_refusal_info(rt, lambda text: tokens.index(text) if text in tokens else None, n_vocab=len(tokens) or None)
    for key in (Keys.CATEGORIES, Keys.CALIBRATION):
        if key in rt:
            rt[key] = json.loads(rt[key])
    refusal = []
    ids = ([info.respond_id] if info.respond_id is not None else []) + info.category_ids
    for tid in ids:
        if tid is not None and 0 <= tid < len(tokens):
            ttype = TokenType(types[tid]).name if tid < len(types) else "?"
            refusal.append({"token": tokens[tid], "id": int(tid), "type": ttype})
    template = get("tokenizer.chat_template") or ""
    tensor_types = sorted({t.tensor_type.name for t in reader.tensors})
    return {
        "path": str(p),
        "architecture": arch,
        "name": get("general.name", ""),
        "parameters": int(sum(int(t.n_elements) for t in reader.tensors)),
        "file_type": _file_type_name(get("general.file_type")),
        "tensor_types": tensor_types,
        "size_bytes": p.stat().st_size,
        "context_length": get(f"{arch}.context_length"),
        "n_layers": get(f"{arch}.block_count"),
        "n_vocab": len(tokens),
        "tokenizer": get("tokenizer.ggml.model"),
        "pre_tokenizer": get("tokenizer.ggml.pre"),
        "refusal_tokens": refusal,
        "rtlocal": rt,
        "chat_template_head": template[:TEMPLATE_HEAD],
    }


def calibration_lines(table: Any) -> list[str]:
    """What a calibration table says the presets mean: measured refusal and over-refusal rates."""
    if not isinstance(table, dict):
        return ["  calibration    present (unreadable)"]
    data = table.get("data") or {}
    where = f" on {data.get('n')} prompts of {', '.join(data.get('splits') or []) or data.get('spec', '?')}" if data else ""
    lines = [f"  calibration    present (target {table.get('target', '?')}{where})"]
    measured = table.get("preset_rates") or {}
    order = list(STRICTNESS_PRESETS)
    for name in sorted(measured, key=lambda n: order.index(n) if n in order else len(order)):
        rates = measured[name]
        lines.append(
            f"    {name:<9} refuses {rates.get('refusal_rate', float('nan')):.1%} of should-refuse, "
            f"{rates.get('over_refusal_rate', float('nan')):.1%} of should-answer prompts"
        )
    return lines


def format_report(info: dict[str, Any]) -> str:
    """The human-readable form of `inspect_gguf`."""
    size_mb = info["size_bytes"] / 1e6
    lines = [
        f"{info['path']}",
        f"  architecture   {info['architecture']}  ({info['n_layers']} layers, context {info['context_length']})",
        f"  parameters     {info['parameters']:,}",
        f"  type           {info['file_type']}  (tensors: {', '.join(info['tensor_types'])})",
        f"  size           {size_mb:.1f} MB",
        f"  vocabulary     {info['n_vocab']:,} tokens ({info['tokenizer']}, pre-tokenizer {info['pre_tokenizer']})",
    ]
    if info["refusal_tokens"]:
        lines.append(f"  refusal mode   {info['rtlocal'].get(Keys.MODE, '?')}")
        th_of = {c["name"]: c.get("threshold") for c in info["rtlocal"].get(Keys.CATEGORIES) or []}
        for t in info["refusal_tokens"]:
            cat = t["token"][1:-1]
            th = f"  threshold {th_of[cat]:.2f}" if th_of.get(cat) is not None else ""
            lines.append(f"    {t['id']:>7}  {t['type']:<8} {t['token']}{th}")
        if Keys.CALIBRATION in info["rtlocal"]:
            lines += calibration_lines(info["rtlocal"][Keys.CALIBRATION])
        if Keys.BASE_MODEL in info["rtlocal"]:
            lines.append(f"  base model     {info['rtlocal'][Keys.BASE_MODEL]}")
    else:
        lines.append("  refusal tokens none (a plain model)")
    head = info["chat_template_head"].replace("\n", "\\n")
    lines.append(f"  chat template  {head[:160] + ('…' if len(head) > 160 else '') if head else '(none)'}")
    return "\n".join(lines)
