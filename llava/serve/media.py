"""Images named by untrusted requests: `data:` URLs always; local files and http(s) URLs only when
the server allows them, inside the allowed folder, under byte, pixel and time limits."""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
from PIL import Image

from ..core.constants import MAX_IMAGE_PIXELS
from ..core.errors import ImageError
from ..data.images import load_image


@dataclass
class MediaPolicy:
    allowed_local_media_path: Path | None = None  # local files only under this folder; None = none at all
    allow_remote_images: bool = False
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = MAX_IMAGE_PIXELS
    fetch_timeout: float = 10.0

    def __post_init__(self):
        if self.allowed_local_media_path is not None:
            folder = Path(self.allowed_local_media_path).resolve()
            if not folder.is_dir():
                raise ImageError(f"--allowed-local-media-path {self.allowed_local_media_path}: not a folder")
            self.allowed_local_media_path = folder


async def load_image_url(url: str, policy: MediaPolicy, label: str = "image_url") -> Image.Image:
    """The image an OpenAI `image_url` names, or ImageError saying what is wrong or not allowed."""
    if not isinstance(url, str) or not url:
        raise ImageError(f"{label}: the url must be a non-empty string")
    scheme = urlparse(url).scheme.lower() if ":" in url[:12] else ""
    if scheme == "data":
        data = _decode_data_url(url, policy.max_image_bytes, label)
    elif scheme in ("http", "https"):
        if not policy.allow_remote_images:
            raise ImageError(f"{label}: fetching http(s) images is disabled on this server "
                             "(start it with --allow-remote-images); send the image as a data: URL")
        try:  # httpx's timeout is per read; this one bounds the whole download
            data = await asyncio.wait_for(_fetch(url, policy, label), policy.fetch_timeout)
        except asyncio.TimeoutError:
            raise ImageError(f"{label}: fetching {url} took longer than {policy.fetch_timeout} s") from None
    elif scheme in ("file", ""):
        data = _read_local(url, scheme, policy, label)
    else:
        raise ImageError(f"{label}: unsupported URL scheme {scheme!r}; use a data: URL")
    # decoding is CPU work: off the event loop, so other requests keep being served meanwhile
    return await asyncio.to_thread(load_image, data, max_bytes=policy.max_image_bytes,
                                   max_pixels=policy.max_image_pixels, name=label)


def _decode_data_url(url: str, max_bytes: int, label: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise ImageError(f"{label}: a data: URL needs a comma before its data")
    if not header.lower().endswith(";base64"):
        raise ImageError(f"{label}: the data: URL must be base64 encoded (data:image/png;base64,...)")
    payload = "".join(payload.split())  # base64 may be wrapped over lines
    if len(payload) // 4 * 3 > max_bytes + 3:  # refuse before decoding
        raise ImageError(f"{label}: about {len(payload) // 4 * 3} bytes is over the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{label}: the data: URL is not valid base64") from None


def _read_local(url: str, scheme: str, policy: MediaPolicy, label: str) -> bytes:
    folder = policy.allowed_local_media_path
    if folder is None:
        raise ImageError(f"{label}: reading local files is disabled on this server "
                         "(start it with --allowed-local-media-path DIR); send the image as a data: URL")
    raw = unquote(urlparse(url).path) if scheme == "file" else url
    path = Path(raw) if Path(raw).is_absolute() else folder / raw
    resolved = path.resolve()  # follows symlinks and '..', so neither can leave the folder
    if not resolved.is_relative_to(folder):
        raise ImageError(f"{label}: {raw} is outside the allowed media folder")
    if not resolved.is_file():
        raise ImageError(f"{label}: {raw}: no such file in the allowed media folder")
    size = resolved.stat().st_size
    if size > policy.max_image_bytes:
        raise ImageError(f"{label}: {size} bytes is over the limit of {policy.max_image_bytes} bytes")
    return resolved.read_bytes()


async def _fetch(url: str, policy: MediaPolicy, label: str) -> bytes:
    limit = policy.max_image_bytes
    try:
        async with httpx.AsyncClient(timeout=policy.fetch_timeout, follow_redirects=True,
                                     max_redirects=3) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise ImageError(f"{label}: fetching {url} gave HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limit:
                    raise ImageError(f"{label}: {url} is {declared} bytes, over the limit of {limit} bytes")
                chunks, total = [], 0
                async for chunk in response.aiter_bytes():
                    total += len(chunk)
                    if total > limit:
                        raise ImageError(f"{label}: {url} is over the limit of {limit} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
    except httpx.TimeoutException:
        raise ImageError(f"{label}: fetching {url} took longer than {policy.fetch_timeout} s") from None
    except httpx.HTTPError as e:
        raise ImageError(f"{label}: cannot fetch {url} ({e.__class__.__name__})") from None
