"""One identity for a terminal phone number, whatever edition of the header carried it.

The header's terminal phone number is BCD[6] (12 digits) in JT/T 808-2011/2013 and BCD[10]
(20 digits) in JT/T 808-2019 (table 2), left-padded with zeros; people write it without the
padding (an 11-digit mobile number).  ``013800138000``, ``00000000013800138000`` and
``13800138000`` are one terminal.  :func:`canonical_phone` is the one form every part of the
platform stores and compares: the number without its padding, padded again to 12 digits when
it fits BCD[6], else to 20.  Some devices put hex digits a-f in the BCD; they are kept (in
lower case).
"""

from __future__ import annotations

from functools import lru_cache

# BCD[6] before 2019, BCD[10] in 2019 (JT/T 808-2019 table 2).
SHORT_DIGITS = 12
LONG_DIGITS = 20
_DIGITS = frozenset("0123456789abcdef")


class PhoneError(ValueError):
    """Not a terminal phone number."""


@lru_cache(maxsize=65_536)  # a fleet's phones, so that the per-position call costs a lookup
def canonical_phone(phone: str) -> str:
    """The stored form of a terminal phone (see the module docstring); :class:`PhoneError` if
    ``phone`` is empty, longer than 20 digits or not (BCD) digits."""
    digits = phone.strip().lower()
    if not digits or len(digits) > LONG_DIGITS or not set(digits) <= _DIGITS:
        raise PhoneError(f"{phone!r} is not a terminal phone number (1 to 20 digits)")
    core = digits.lstrip("0")
    return core.rjust(SHORT_DIGITS if len(core) <= SHORT_DIGITS else LONG_DIGITS, "0")
