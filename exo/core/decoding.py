"""What validated decoding of untrusted bytes can raise, for every floor that decodes them."""

from __future__ import annotations

import msgspec

# msgspec before 0.23 reported invalid UTF-8 in a string as a plain UnicodeDecodeError (0.23 raises
# DecodeError), so every receive path (bus frames, runner frames, stored events) catches this tuple.
DECODE_ERRORS: tuple[type[Exception], ...] = (
    msgspec.DecodeError,
    msgspec.ValidationError,
    UnicodeDecodeError,
)
