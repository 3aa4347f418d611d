"""Generation parameters read back from a PNG: ours, AUTOMATIC1111's, or ComfyUI's.

One parser for the UI (a PNG dropped on the form), the API (``POST /api/png-info``) and
scripts. What it answers uses our job field names, so the result can be sent back to
``POST /api/generate`` as it is (after the user's changes).

The PNG's chunks are walked here by hand rather than through Pillow: Pillow reads text
chunks that come after the image data only by decoding every pixel (``load()``), and a
hostile file can declare a huge image. Walking the chunks reads nothing but the text:
lengths are checked against what is left of the bytes, compressed text is inflated to a
bounded size, and the pixel data is skipped unread. Everything dropped on a server is
hostile until proven otherwise: any malformed input is :class:`PngInfoError`.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

from .checks import SCHEDULERS
from .outputs import PNG_SIGNATURE, parse_infotext

#: Text chunks larger than this once inflated are refused (A1111 and ComfyUI write a few
#: kilobytes; a ComfyUI workflow with many nodes may reach a few hundred).
MAX_TEXT_BYTES = 4 << 20
#: At most this much inflated text in one file, all chunks together.
MAX_TOTAL_TEXT = 16 << 20
#: A1111's parameter line is parsed with A1111's own pattern, which backtracks: its time grows
#: with the square of the line (a second at 16,000 characters). Real lines hold a few hundred
#: characters, a few thousand with many LoRA hashes.
MAX_PARAMETER_LINE = 8192
#: ComfyUI graphs: nodes looked at, and JSON nesting allowed before parsing.
MAX_NODES = 5000
MAX_DEPTH = 64

#: Our job fields a record (our ``imagineerd`` chunk) may give back.
OUR_FIELDS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "width",
    "height",
    "guidance_scale",
    "scheduler",
    "model",
    "loras",
    "clip_skip",
    "vae",
    "strength",
    "mask_blur",
    "inpaint_area",
    "hires",
)

_BY_LABEL = {label.lower(): key for key, label in SCHEDULERS.items()}
_BY_LABEL.update({key: key for key in SCHEDULERS})
#: ComfyUI's sampler names (``comfy/samplers.py``) for ours; Karras schedule where it has one.
_COMFY_SAMPLERS = {
    "euler": "euler",
    "euler_ancestral": "euler_a",
    "dpmpp_2m": "dpmpp_2m",
    "ddim": "ddim",
    "uni_pc": "unipc",
    "uni_pc_bh2": "unipc",
    "heun": "heun",
}


class PngInfoError(ValueError):
    """The bytes are not a PNG whose text can be read; the message says what is wrong."""


def text_chunks(data: bytes) -> dict[str, str]:
    """The ``tEXt``, ``zTXt`` and ``iTXt`` chunks of a PNG as ``{keyword: text}`` (the first
    of a keyword wins). Raises :class:`PngInfoError` for anything that is not a PNG."""
    if not data.startswith(PNG_SIGNATURE):
        raise PngInfoError("the body is not a PNG image (it does not start with the PNG signature)")
    found: dict[str, str] = {}
    total, at = 0, len(PNG_SIGNATURE)
    while at < len(data):
        if at + 8 > len(data):
            raise PngInfoError("the PNG is truncated (a chunk header is cut off)")
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        start, end = at + 8, at + 8 + length
        if end + 4 > len(data):
            raise PngInfoError(
                f"the PNG is truncated or damaged (a {kind!r} chunk claims {length} bytes)"
            )
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            body = data[start:end]
            crc = struct.unpack(">I", data[end : end + 4])[0]
            if zlib.crc32(kind + body) != crc:
                raise PngInfoError(f"a {kind.decode()} chunk of the PNG is damaged (bad CRC)")
            keyword, text = _text(kind, body)
            total += len(text)
            if total > MAX_TOTAL_TEXT:
                raise PngInfoError(f"the PNG holds more than {MAX_TOTAL_TEXT} bytes of text")
            found.setdefault(keyword, text)
        if kind == b"IEND":
            break
        at = end + 4
    return found


def _inflate(raw: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(raw, MAX_TEXT_BYTES + 1)
    except zlib.error:
        raise PngInfoError("a compressed text chunk of the PNG is damaged") from None
    if len(out) > MAX_TEXT_BYTES or inflater.unconsumed_tail:
        raise PngInfoError(f"a text chunk of the PNG inflates past {MAX_TEXT_BYTES} bytes")
    return out


def _text(kind: bytes, body: bytes) -> tuple[str, str]:
    keyword, sep, rest = body.partition(b"\0")
    if not sep or not 1 <= len(keyword) <= 79:
        raise PngInfoError(f"a {kind.decode()} chunk of the PNG has no valid keyword")
    name = keyword.decode("latin-1")
    if kind == b"tEXt":
        raw, encoding = rest, "latin-1"
    elif kind == b"zTXt":
        if not rest or rest[0] != 0:
            raise PngInfoError("a zTXt chunk of the PNG uses an unknown compression")
        raw, encoding = _inflate(rest[1:]), "latin-1"
    else:  # iTXt: flag, method, language\0, translated keyword\0, text (UTF-8)
        if len(rest) < 2:
            raise PngInfoError("an iTXt chunk of the PNG is cut off")
        compressed, method = rest[0], rest[1]
        parts = rest[2:].split(b"\0", 2)
        if len(parts) != 3 or compressed not in (0, 1) or (compressed and method != 0):
            raise PngInfoError("an iTXt chunk of the PNG is malformed")
        raw, encoding = (_inflate(parts[2]) if compressed else parts[2]), "utf-8"
    if len(raw) > MAX_TEXT_BYTES:
        raise PngInfoError(f"a text chunk of the PNG is longer than {MAX_TEXT_BYTES} bytes")
    try:
        return name, raw.decode(encoding)
    except UnicodeDecodeError:
        raise PngInfoError(f"the text of the PNG's {name[:40]!r} chunk is not UTF-8") from None


def read(data: bytes) -> dict[str, Any]:
    """``{"format", "parameters", "extra", "infotext"}`` of a PNG's bytes: ``format`` is
    ``imagineerd``, ``a1111``, ``comfyui`` or None (no parameters found); ``parameters``
    holds our job fields; ``extra`` what the source said that has no field here (A1111's
    keys, verbatim); ``infotext`` the ``parameters`` text as found."""
    chunks = text_chunks(data)
    infotext = chunks.get("parameters")
    answer: dict[str, Any] = {"format": None, "parameters": {}, "extra": {}, "infotext": infotext}
    record = _json(chunks.get("imagineerd"))
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        answer["format"] = "imagineerd"
        answer["parameters"] = {key: record[key] for key in OUR_FIELDS if key in record}
        return answer
    if infotext and infotext.strip():
        answer["format"] = "a1111"
        answer["parameters"], answer["extra"] = from_infotext(infotext)
        return answer
    graph = _json(chunks.get("prompt"))
    if isinstance(graph, dict):
        found = from_comfy(graph)
        if found:
            answer["format"] = "comfyui"
            answer["parameters"] = found
    return answer


def _json(text: str | None) -> Any:
    if not text:
        return None
    # json.loads recurses per level: a deep nest would overflow the stack (RecursionError).
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    if deepest > MAX_DEPTH:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _number(text: str, kind: type) -> int | float | None:
    try:
        value = float(text) if kind is float else int(text.strip())
    except (TypeError, ValueError, OverflowError):
        return None
    return value if kind is int or value == value else None  # NaN is no number


def from_infotext(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A1111's ``parameters`` text as our fields, and the keys we have no field for."""
    last = text.strip().rsplit("\n", 1)[-1]
    if len(last) > MAX_PARAMETER_LINE:
        raise PngInfoError(
            f"the PNG's parameters text has a last line of {len(last)} characters; "
            f"a parameter line is read up to {MAX_PARAMETER_LINE}"
        )
    parsed = parse_infotext(text)
    fields: dict[str, Any] = {"prompt": parsed.pop("prompt")}
    negative = parsed.pop("negative_prompt")
    if negative:
        fields["negative_prompt"] = negative
    for key, name, kind in (
        ("Steps", "steps", int),
        ("Seed", "seed", int),
        ("CFG scale", "guidance_scale", float),
        ("Clip skip", "clip_skip", int),
        ("Denoising strength", "strength", float),
    ):
        if key in parsed:
            value = _number(parsed[key], kind)
            if value is not None:
                fields[name] = value
                del parsed[key]
    size = parsed.get("Size", "")
    width, _, height = size.partition("x")
    if _number(width, int) is not None and _number(height, int) is not None:
        fields["width"], fields["height"] = int(width), int(height)
        del parsed["Size"]
    sampler = _scheduler(parsed.get("Sampler", ""), parsed.get("Schedule type", ""))
    if sampler is not None:
        fields["scheduler"] = sampler
        parsed.pop("Sampler", None)
        parsed.pop("Schedule type", None)
    if parsed.get("Model"):
        fields["model"] = parsed.pop("Model")
    return fields, parsed


def _scheduler(sampler: str, schedule: str) -> str | None:
    key = _BY_LABEL.get(sampler.strip().lower())
    if key == "dpmpp_2m" and schedule.strip().lower() == "karras":
        return "dpmpp_2m_karras"
    return key


def from_comfy(graph: dict[str, Any]) -> dict[str, Any]:
    """A simple ComfyUI ``prompt`` graph (API format: ``{id: {"class_type", "inputs"}}``) as
    our fields: the first KSampler's seed, steps, cfg and sampler, the text of the
    CLIPTextEncode nodes its positive and negative inputs name, the EmptyLatentImage size
    and the checkpoint's name. Whatever is not plainly there is left out."""
    nodes = {
        key: node
        for key, node in list(graph.items())[:MAX_NODES]
        if isinstance(node, dict) and isinstance(node.get("inputs"), dict)
    }
    sampler = next(
        (
            n["inputs"]
            for n in nodes.values()
            if n.get("class_type") in ("KSampler", "KSamplerAdvanced")
        ),
        None,
    )
    if sampler is None:
        return {}

    def linked(value: Any) -> dict[str, Any] | None:
        # An input wired to another node is [node id, output index].
        if isinstance(value, list) and value and isinstance(value[0], str | int):
            return nodes.get(str(value[0]))
        return None

    def text_of(value: Any) -> str | None:
        node = linked(value)
        if node is None or "CLIPTextEncode" not in str(node.get("class_type")):
            return None
        text = node["inputs"].get("text", node["inputs"].get("text_g"))
        return text if isinstance(text, str) else None

    fields: dict[str, Any] = {}
    prompt = text_of(sampler.get("positive"))
    if prompt is not None:
        fields["prompt"] = prompt
    negative = text_of(sampler.get("negative"))
    if negative:
        fields["negative_prompt"] = negative
    for key, name in (("seed", "seed"), ("noise_seed", "seed"), ("steps", "steps")):
        value = sampler.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            fields[name] = value
    cfg = sampler.get("cfg")
    if isinstance(cfg, int | float) and not isinstance(cfg, bool):
        fields["guidance_scale"] = float(cfg)
    name = sampler.get("sampler_name")
    if isinstance(name, str) and name in _COMFY_SAMPLERS:
        key = _COMFY_SAMPLERS[name]
        if key == "dpmpp_2m" and sampler.get("scheduler") == "karras":
            key = "dpmpp_2m_karras"
        fields["scheduler"] = key
    latent = linked(sampler.get("latent_image"))
    if latent is not None and latent.get("class_type") == "EmptyLatentImage":
        width, height = latent["inputs"].get("width"), latent["inputs"].get("height")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (width, height)):
            fields["width"], fields["height"] = width, height
    loader = linked(sampler.get("model"))
    if loader is not None and isinstance(loader["inputs"].get("ckpt_name"), str):
        fields["model"] = loader["inputs"]["ckpt_name"]
    return fields
