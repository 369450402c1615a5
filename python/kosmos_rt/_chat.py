"""OpenAI-style chat messages → the JSON the C ABI renders, and their images in order.

Image parts may be OpenAI's (`{"type": "image_url", "image_url": {"url": ...}}` with a
`data:` URL, a `file://` URL or a local path) or Hugging Face's (`{"type": "image", "image":
<path | bytes | PIL image>}`, or `"url"` / `"path"` instead of `"image"`). Nothing is fetched
from the network.
"""

from __future__ import annotations

import base64
import binascii
import json
from urllib.parse import unquote, urlparse

_PLACE = {"type": "image_url", "image_url": {"url": ""}}


def split_images(messages) -> tuple[str, list]:
    """(the messages as JSON with each image part a bare place, the images in order)."""
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise TypeError("messages: expected a list of {'role': ..., 'content': ...} objects")
    out, images = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"messages[{i}]: expected a dict, got {type(message).__name__}")
        message = dict(message)
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            parts = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if not isinstance(part, dict):
                    raise TypeError(f"{where}: expected a dict, got {type(part).__name__}")
                kind = part.get("type")
                if kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    images.append(_from_url(url, where))
                    parts.append(_PLACE)
                elif kind == "image":
                    image = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
                    if image is None:
                        raise ValueError(f"{where}: an image part needs 'image', 'url' or 'path'")
                    images.append(_from_url(image, where) if isinstance(image, str) else image)
                    parts.append(_PLACE)
                else:
                    parts.append(part)
            message["content"] = parts
        out.append(message)
    return json.dumps(out, ensure_ascii=False), images


def _from_url(url, where: str):
    """A path or the encoded bytes behind an image URL."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"{where}: the image URL must be a non-empty string")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise ValueError(f"{where}: a data: URL must be base64 (data:image/png;base64,...)")
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error as e:
            raise ValueError(f"{where}: the data: URL is not valid base64: {e}") from None
    scheme = urlparse(url).scheme
    if scheme == "file":
        return unquote(urlparse(url).path)
    if scheme in ("http", "https"):
        raise ValueError(f"{where}: {scheme} image URLs are not fetched here; pass the image's bytes or path")
    return url
