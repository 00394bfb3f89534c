"""Firmware upgrades by instant message ([00140], [00144]), in-band:

``<firmware xmlns="urn:gridpresence:0" id="…" version="2.1.0" sha256="…" size="1234">BASE64</firmware>``
in a ``<message type="normal">`` to a device; it answers the sender with
``<firmware-result id="…" device="…" status="applied|rejected|failed" reason="…" version="…">detail</firmware-result>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import uuid
from enum import StrEnum
from xml.etree import ElementTree as ET

from pydantic import Field, field_validator
from slixmpp import Message
from slixmpp.xmlstream import ElementBase, register_stanza_plugin

from gridpresence.protocol.codec import PayloadError, _attrs, _expect, _fields, _validate, q
from gridpresence.protocol.models import _ID, NS, _Model

# In-band images stay well under Prosody's 256 KiB stanza limit once base64-encoded.
MAX_IMAGE_BYTES = 128 * 1024
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,39}$")


class FirmwareStatus(StrEnum):
    APPLIED = "applied"
    REJECTED = "rejected"  # not now (restricted), or not from you: the image was not applied
    FAILED = "failed"  # the image is bad (hash, size, encoding), or the campaign timed out


class FirmwareReason(StrEnum):
    RESTRICTED = "restricted"
    NOT_AUTHORISED = "not-authorised"
    BAD_IMAGE = "bad-image"
    TIMEOUT = "timeout"
    UNDELIVERABLE = "undeliverable"


class FirmwareImage(_Model):
    id: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=1, le=MAX_IMAGE_BYTES)
    data: bytes = Field(repr=False)

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("firmware id must be 1-64 characters of [A-Za-z0-9._:-]")
        return value

    @field_validator("version")
    @classmethod
    def _version_shape(cls, value: str) -> str:
        if not _VERSION.match(value):
            raise ValueError("version must be 1-40 characters of [A-Za-z0-9._+-]")
        return value

    @classmethod
    def new(cls, data: bytes, version: str) -> FirmwareImage:
        return cls(id=uuid.uuid4().hex, version=version, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                   data=data)

    def check(self) -> None:
        """Raise PayloadError unless the image is what its size and hash say."""
        if len(self.data) != self.size:
            raise PayloadError(f"image is {len(self.data)} bytes, header says {self.size}")
        if hashlib.sha256(self.data).hexdigest() != self.sha256:
            raise PayloadError("image does not match its sha256")


class FirmwareResult(_Model):
    id: str = Field(min_length=1, max_length=64)
    device: str = Field(min_length=3, max_length=300)
    status: FirmwareStatus
    reason: FirmwareReason | None = None
    version: str | None = Field(default=None, max_length=40)
    detail: str = Field(default="", max_length=300)


def firmware_to_xml(image: FirmwareImage) -> ET.Element:
    el = ET.Element(q("firmware"), _attrs(image, skip=("data",)))
    el.text = base64.b64encode(image.data).decode("ascii")
    return el


def firmware_from_xml(el: ET.Element | None) -> FirmwareImage:
    el = _expect(el, "firmware")
    text = (el.text or "").strip()
    if len(text) > (MAX_IMAGE_BYTES * 4) // 3 + 8:
        raise PayloadError(f"image larger than {MAX_IMAGE_BYTES} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PayloadError("image is not valid base64") from None
    image = _validate(FirmwareImage, {**_fields(FirmwareImage, el.attrib), "data": data}, "firmware")
    image.check()
    return image


def result_to_xml(result: FirmwareResult) -> ET.Element:
    el = ET.Element(q("firmware-result"), _attrs(result, skip=("detail",)))
    el.text = result.detail or None
    return el


def result_from_xml(el: ET.Element | None) -> FirmwareResult:
    el = _expect(el, "firmware-result")
    return _validate(FirmwareResult, {**_fields(FirmwareResult, el.attrib), "detail": (el.text or "").strip()},
                     "firmware result")


class GridFirmware(ElementBase):
    name = "firmware"
    namespace = NS
    plugin_attrib = "grid_firmware"


class GridFirmwareResult(ElementBase):
    name = "firmware-result"
    namespace = NS
    plugin_attrib = "grid_firmware_result"


register_stanza_plugin(Message, GridFirmware)
register_stanza_plugin(Message, GridFirmwareResult)
