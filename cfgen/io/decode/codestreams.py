"""The marker and chunk structure of JPEG, JPEG-LS, JPEG 2000 and PNG streams, read without decoding them.

Two questions are answered here from the bytes alone: what a stream declares (the JPEG process, precision and size
of its frame header, the NEAR of a JPEG-LS scan), and whether it is complete. Completeness matters because the
lenient decoders (libjpeg, openjpeg) turn a stream that was cut off in transfer into a picture whose lower part is
filler, without an error; a stream is only handed to them when it ends where its format says it must:

- JPEG and JPEG-LS (ITU-T T.81 B.2, T.87 C.2): marker segments, each scan's entropy-coded data, and finally EOI
  (FFD9). In T.81 entropy data FF is followed by 00 (stuffing) or a restart marker; in JPEG-LS by a byte below 0x80.
- JPEG 2000 (ISO 15444-1 A.3): the codestream ends with EOC (FFD9); a JP2 file ends with its codestream.
- PNG (ISO 15948 5.3-5.6): chunks of length, type, data and CRC-32, the critical ones' CRCs right, ending in IEND.

Each `*_defect` function returns None for a complete stream, else a sentence saying what was found.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from typing import NamedTuple

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
_EOI = 0xD9
_SOS = 0xDA
_SOF_JPEG_LS = 0xF7

#: Start-of-frame markers: 0xC0 baseline, 0xC1 extended, 0xC2 progressive, 0xC3 lossless, 0xC5-0xC7 hierarchical,
#: 0xC9-0xCF arithmetic-coded, 0xF7 JPEG-LS.
SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
# Markers without a length field: TEM, RSTn, SOI, EOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8, _EOI})


class JpegFrame(NamedTuple):
    """The frame header (SOF segment) of a JPEG or JPEG-LS stream."""

    marker: int  # one of SOF_MARKERS
    precision: int  # sample precision P: 8, 12 or 16 (2-16 for lossless and JPEG-LS)
    rows: int  # Y; 0 when a DNL segment after the first scan gives it
    columns: int  # X
    components: int  # Nf


def jpeg_segments(data: bytes) -> Iterator[tuple[int, int]]:
    """(marker, offset of the marker) of each JPEG marker segment up to the first scan."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        yield marker, position
        if marker == _SOS:  # start of scan: entropy-coded data follows
            return
        if marker in _STANDALONE:
            position += 2
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """The frame header of a JPEG codestream, or None when there is no readable one before the first scan."""
    for marker, position in jpeg_segments(data):
        if marker in SOF_MARKERS and position + 10 <= len(data):
            header = data[position + 4 : position + 10]
            return JpegFrame(marker, header[0], int.from_bytes(header[1:3], "big"),
                             int.from_bytes(header[3:5], "big"), header[5])
    return None


def jpeg_frame_marker(data: bytes) -> int | None:
    """The SOF marker (0xC0 baseline, 0xC1 extended, 0xC3 lossless, 0xF7 JPEG-LS, ...) of a JPEG codestream."""
    frame = jpeg_frame(data)
    return frame.marker if frame else None


def jpeg_precision(data: bytes) -> int | None:
    """Sample precision P of the frame header (8, 12 or 16)."""
    frame = jpeg_frame(data)
    return frame.precision if frame else None


def jpeg_ls_near(data: bytes) -> int | None:
    """NEAR of the first JPEG-LS scan header (ISO 14495-1 C.2.3): 0 means lossless."""
    for marker, position in jpeg_segments(data):
        if marker == _SOS and position + 5 < len(data):
            components = data[position + 4]
            near_at = position + 5 + 2 * components
            return int(data[near_at]) if near_at < len(data) else None
    return None


def jpeg_defect(data: bytes) -> str | None:
    """None when a JPEG or JPEG-LS codestream runs from SOI through its scans to EOI, else what is missing.

    Bytes after EOI are allowed (DICOM pads fragments to an even length). Stray bytes between segments are skipped
    to the next marker, as libjpeg does, so only a stream that ends early or has a segment longer than the
    remaining bytes is reported.
    """
    if not data.startswith(JPEG_SOI):
        return "no SOI marker (FFD8) at the start of the JPEG stream"
    jpeg_ls = False
    scans = 0
    position, size = 2, len(data)
    while True:
        position = data.find(b"\xff", position)
        if position < 0 or position + 1 >= size:
            where = f"inside scan {scans}" if scans else "before the first scan"
            return f"no EOI marker (FFD9): the {size}-byte stream ends {where}, so its pixels are incomplete"
        marker = data[position + 1]
        if marker == 0xFF or marker == 0x00:  # fill byte, or a stuffed byte of skipped data
            position += 1
            continue
        if marker == _EOI:
            return None if scans else "EOI marker before any scan: the stream holds no pixels"
        if marker in _STANDALONE:
            position += 2
            continue
        if position + 4 > size:
            return f"the stream ends inside the header of marker FF{marker:02X} at byte {position}"
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if end > size:
            return f"marker segment FF{marker:02X} at byte {position} runs {end - size} bytes past the end of the stream"
        jpeg_ls = jpeg_ls or marker == _SOF_JPEG_LS
        position = end
        if marker == _SOS:
            scans += 1
            position = _entropy_coded_end(data, position, jpeg_ls)


# The marker that ends a scan's entropy-coded data: FF followed by neither a stuffed byte nor RSTn (after which the
# coded data goes on). T.81 F.1.2.3 stuffs 00 after a coded FF; T.87 A.1 (JPEG-LS) a 0 bit, so any byte below 0x80.
_SCAN_END = re.compile(rb"\xff(?=[\x01-\xcf\xd8-\xff])")
_SCAN_END_JPEG_LS = re.compile(rb"\xff(?=[\x80-\xcf\xd8-\xff])")


def _entropy_coded_end(data: bytes, position: int, jpeg_ls: bool) -> int:
    """The offset of the marker that ends the entropy-coded data starting at `position` (len(data) if none)."""
    found = (_SCAN_END_JPEG_LS if jpeg_ls else _SCAN_END).search(data, position)
    return found.start() if found else len(data)


def j2k_defect(data: bytes) -> str | None:
    """None when a JPEG 2000 codestream (or JP2 file) ends with EOC (FFD9), else what was found instead."""
    end = data.rstrip(b"\x00")  # DICOM pads a fragment of odd length with one NUL
    if end.endswith(b"\xff\xd9"):
        return None
    return f"no EOC marker (FFD9) at the end of the {len(data)}-byte JPEG 2000 codestream: it ends early"


def rle_defect(data: bytes) -> str | None:
    """None when the RLE header (PS3.5 G.5: segment count, then 15 offsets) points inside the frame."""
    if len(data) < 64:
        return f"RLE frame of {len(data)} bytes is shorter than its 64-byte header"
    segments = int.from_bytes(data[:4], "little")
    offsets = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "little") for i in range(min(segments, 15))]
    if not 1 <= segments <= 15 or offsets[0] != 64:
        return f"RLE header declares {segments} segments, the first at byte {offsets[0] if offsets else None}"
    if any(b <= a for a, b in zip(offsets, offsets[1:])) or offsets[-1] >= len(data):
        return f"RLE segment offsets {offsets} do not fit in the {len(data)}-byte frame: it ends early"
    return None


def png_defect(data: bytes) -> str | None:
    """None when a PNG runs chunk by chunk to IEND with the CRC of every critical chunk right, as libpng checks."""
    if not data.startswith(PNG_SIGNATURE):
        return "no PNG signature"
    position, size = len(PNG_SIGNATURE), len(data)
    while position + 8 <= size:
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        end = position + 12 + length
        name = kind.decode("latin-1")
        if end > size:
            return f"the PNG ends inside chunk {name!r} at byte {position} ({end - size} bytes missing)"
        critical = 0x41 <= kind[0] <= 0x5A  # IHDR, PLTE, IDAT, IEND: an upper-case first letter (ISO 15948 5.4)
        stored_crc = int.from_bytes(data[end - 4 : end], "big")
        if critical and zlib.crc32(data[position + 4 : end - 4]) != stored_crc:
            return f"CRC of critical chunk {name!r} at byte {position} does not match its data"
        if kind == b"IEND":
            return None
        position = end
    return f"no IEND chunk: the {size}-byte PNG ends early"
