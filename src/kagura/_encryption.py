"""Encryption at rest for what the store keeps of users' data: ``KAGURA_ENCRYPTION_KEY``.

With a key set, recorded prompts, outputs, arguments and error texts, and the durable journal's
payloads, are stored as Fernet tokens (AES-128-CBC with an HMAC-SHA256, from the
``cryptography`` package) behind a marker, ``kagura:enc1:``. No JSON text starts with it, and no
ordinary text does either, so readers tell encrypted values from plaintext: values written before
encryption was turned on stay readable, and an encrypted value is never shown as if it were text.

``KAGURA_ENCRYPTION_KEY`` holds one key (``kagura keygen`` prints a new one), or several
separated by commas: the first encrypts, every one decrypts. To rotate, put a new key first and
keep the old ones after it for as long as values written with them are to be read.

The variable is read at every call (tests change it; the recorder's writer process inherits
it), and the parsed keys are cached by its value. ``cryptography`` is imported only when a key is
set. Messages never include a key or a value.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import EncryptionKeyError, UsageError

if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet

__all__ = ["ENV", "MARKER", "decrypt", "enabled", "encrypt", "generate_key", "is_encrypted"]

ENV = "KAGURA_ENCRYPTION_KEY"
#: What every encrypted value starts with; the rest is a Fernet token (URL-safe base64).
MARKER = "kagura:enc1:"
_MARKER_LENGTH = len(MARKER)
_INSTALL = "pip install 'kagura[encryption]'"
_ROTATION = (
    "after a key rotation, the new key comes first and the older ones follow it, "
    "comma-separated (the first key encrypts, every key decrypts)"
)

# Parsed keys by the variable's value: parsing builds a Fernet object per key, and encrypting a
# batch of rows asks for them once a value.
_ciphers: dict[str, MultiFernet] = {}
_MAX_CACHED = 8


def enabled() -> bool:
    """Is a key configured, so that values written now are encrypted?

    Raises :class:`~kagura.errors.EncryptionKeyError` when ``KAGURA_ENCRYPTION_KEY`` holds a
    malformed key, and :class:`~kagura.errors.UsageError` when ``cryptography`` is missing: a
    writer that asks before writing fails rather than store in plaintext what was meant to be
    encrypted.
    """
    return _cipher() is not None


def encrypt(text: str | None) -> str | None:
    """``text`` encrypted (``MARKER`` and a Fernet token) with the first configured key;
    ``text`` unchanged when no key is configured (and ``None`` as ``None``)."""
    if text is None:
        return None
    cipher = _cipher()
    if cipher is None:
        return text
    return MARKER + cipher.encrypt(text.encode()).decode("ascii")


def decrypt(text: str | None, what: str = "an encrypted value") -> str | None:
    """``text`` as it was before :func:`encrypt`: plaintext (and ``None``) as it is, an encrypted
    value decrypted with whichever configured key it was written with.

    Raises :class:`~kagura.errors.EncryptionKeyError`, with ``what`` (what the value is, for the
    message) in its message, when no key is configured or none of them decrypts the value: never
    a garbled value.
    """
    if text is None or not text.startswith(MARKER):
        return text
    cipher = _cipher()
    if cipher is None:
        raise EncryptionKeyError(
            f"cannot read {what}: it is encrypted, and {ENV} is not set. Set it to the key it "
            f"was written with; {_ROTATION}."
        )
    from cryptography.fernet import InvalidToken

    try:
        return cipher.decrypt(text[_MARKER_LENGTH:].encode("ascii")).decode()
    except (InvalidToken, UnicodeError):
        raise EncryptionKeyError(
            f"cannot read {what}: it is encrypted with a key that {ENV} does not hold (or it is "
            f"damaged). Add the key it was written with: {_ROTATION}."
        ) from None


def is_encrypted(text: str | None) -> bool:
    """Is ``text`` a value :func:`encrypt` encrypted?"""
    return text is not None and text.startswith(MARKER)


def generate_key() -> str:
    """A new random key for ``KAGURA_ENCRYPTION_KEY`` (32 bytes, URL-safe base64)."""
    try:
        from cryptography.fernet import Fernet
    except ImportError:
        raise UsageError(f"generating a key needs the cryptography package: {_INSTALL}") from None
    return Fernet.generate_key().decode("ascii")


def _cipher() -> MultiFernet | None:
    value = os.environ.get(ENV)
    if not value:
        return None
    cipher = _ciphers.get(value)
    if cipher is None:
        keys = [key for key in (part.strip() for part in value.split(",")) if key]
        if not keys:  # "$NEW,$OLD" with both unset, say: meant to encrypt, so never plaintext
            raise EncryptionKeyError(
                f"{ENV} is set but holds no key (only commas or spaces): set it to a key from "
                f"`kagura keygen` (keys to rotate from after it, comma-separated), or unset it "
                f"to store values unencrypted"
            )
        cipher = _parse(keys)
        if len(_ciphers) >= _MAX_CACHED:
            _ciphers.clear()
        _ciphers[value] = cipher
    return cipher


def _parse(keys: list[str]) -> MultiFernet:
    try:
        from cryptography.fernet import Fernet, MultiFernet
    except ImportError:
        raise UsageError(
            f"{ENV} is set, and encrypting needs the cryptography package: {_INSTALL}"
        ) from None
    fernets = []
    for number, key in enumerate(keys, 1):
        try:
            fernets.append(Fernet(key))
        except (ValueError, TypeError):
            # Never the key itself in the message: it is a secret, even when malformed.
            which = f"key {number} of {len(keys)}" if len(keys) > 1 else "its key"
            raise EncryptionKeyError(
                f"{ENV} is malformed ({which}): a key is 32 random bytes in URL-safe base64 "
                f"(44 characters), as `kagura keygen` prints it, and several keys are separated "
                f"by commas"
            ) from None
    return MultiFernet(fernets)
