#!/usr/bin/env python3
"""Write the ELF kernel inside an x86 bzImage whose payload is xz (Debian's) to argv[2]."""
import lzma
import sys

with open(sys.argv[1], "rb") as f:
    image = f.read()
start = image.find(b"\xfd7zXZ\x00")
while start != -1:
    try:
        payload = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(image[start:])
    except lzma.LZMAError:
        payload = b""
    if payload.startswith(b"\x7fELF"):
        with open(sys.argv[2], "wb") as f:
            f.write(payload)
        sys.exit(0)
    start = image.find(b"\xfd7zXZ\x00", start + 1)
sys.exit(f"{sys.argv[1]}: no xz-compressed ELF kernel inside")
