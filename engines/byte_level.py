"""How byte-level BPE vocabularies (GPT-2 style) spell bytes, to read token names back.

Each byte b is one printable character: printable Latin-1 bytes as themselves, the rest as
code points from 256 upward. Used wherever a token is known only by its vocabulary piece.
"""

from __future__ import annotations


def byte_level_chars() -> dict[str, int]:
    """The character that spells each byte, mapped back to the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in printable]
    chars.update({chr(256 + n): b for n, b in enumerate(others)})
    return chars


BYTE_OF_CHAR = byte_level_chars()
