"""``kagura._encryption``: values encrypted with ``KAGURA_ENCRYPTION_KEY``, plaintext passed
through, key rotation, and clear errors (never a garbled value, never a key in a message);
``kagura keygen``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from cryptography.fernet import Fernet

from kagura import _encryption
from kagura._encryption import MARKER, decrypt, enabled, encrypt, generate_key, is_encrypted
from kagura.cli import main
from kagura.errors import EncryptionKeyError, UsageError

ENV = "KAGURA_ENCRYPTION_KEY"
SECRET = "hunter2-correct-horse-4711"


def test_without_a_key_values_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert not enabled()
    assert encrypt(SECRET) == SECRET
    assert decrypt(SECRET) == SECRET
    assert encrypt(None) is None and decrypt(None) is None
    monkeypatch.setenv(ENV, "")  # set empty: unset, as the convention goes
    assert not enabled()
    # Set to something with no key in it (" , "): see the test below, an error, not plaintext.


def test_a_value_is_encrypted_behind_the_marker_and_decrypts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV, generate_key())
    assert enabled()
    sealed = encrypt(f'{{"password": "{SECRET}", "é": "ü"}}')
    assert sealed is not None and sealed.startswith(MARKER) and is_encrypted(sealed)
    assert SECRET not in sealed
    assert decrypt(sealed) == f'{{"password": "{SECRET}", "é": "ü"}}'
    # Randomised: the same text twice gives two different values.
    assert encrypt(SECRET) != encrypt(SECRET)
    assert encrypt("") != "" and decrypt(encrypt("")) == ""
    assert encrypt(None) is None


def test_plaintext_written_before_a_key_was_set_stays_readable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV, generate_key())
    for text in ('{"text": "doc"}', '"a string"', "42", "null", "ValueError: boom", ""):
        assert decrypt(text) == text
        assert not is_encrypted(text)


def test_an_encrypted_value_without_a_key_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = generate_key()
    monkeypatch.setenv(ENV, key)
    sealed = encrypt(SECRET)
    monkeypatch.delenv(ENV)
    with pytest.raises(EncryptionKeyError) as caught:
        decrypt(sealed, "the arguments of durable run r-1")
    message = str(caught.value)
    assert "cannot read the arguments of durable run r-1" in message
    assert f"{ENV} is not set" in message
    assert "comma-separated" in message
    assert SECRET not in message and key not in message
    assert isinstance(caught.value, UsageError)


def test_a_wrong_key_is_a_clear_error_never_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, generate_key())
    sealed = encrypt(SECRET)
    other = generate_key()
    monkeypatch.setenv(ENV, other)
    with pytest.raises(EncryptionKeyError) as caught:
        decrypt(sealed)
    message = str(caught.value)
    assert f"a key that {ENV} does not hold" in message
    assert "the new key comes first and the older ones follow it" in message
    assert other not in message


def test_a_damaged_value_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, generate_key())
    sealed = encrypt(SECRET)
    assert sealed is not None
    flipped = sealed[:-5] + ("A" if sealed[-5] != "A" else "B") + sealed[-4:]
    for damaged in (flipped, sealed[:-10], MARKER, MARKER + "ünïcode"):
        with pytest.raises(EncryptionKeyError):
            decrypt(damaged)


def test_rotation_the_first_key_encrypts_and_every_key_decrypts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old, new = generate_key(), generate_key()
    monkeypatch.setenv(ENV, old)
    written_before = encrypt("before")
    monkeypatch.setenv(ENV, f"{new}, {old},")  # spaces and a trailing comma are fine
    written_after = encrypt("after")
    assert (decrypt(written_before), decrypt(written_after)) == ("before", "after")
    monkeypatch.setenv(ENV, new)
    assert decrypt(written_after) == "after"
    with pytest.raises(EncryptionKeyError):
        decrypt(written_before)
    monkeypatch.setenv(ENV, old)
    assert decrypt(written_before) == "before"
    with pytest.raises(EncryptionKeyError):
        decrypt(written_after)


@pytest.mark.parametrize(
    ("setting", "which"),
    [
        ("not-a-key", "its key"),
        ("{good},tooshort", "key 2 of 2"),
        ("{good},ÄÖÜ-not-ascii", "key 2 of 2"),
        ("{long},{good}", "key 1 of 2"),
    ],
)
def test_a_malformed_key_names_the_variable_and_never_echoes_the_key(
    monkeypatch: pytest.MonkeyPatch, setting: str, which: str
) -> None:
    good = generate_key()
    long = "A" * 48  # base64, but of 36 bytes
    value = setting.format(good=good, long=long)
    monkeypatch.setenv(ENV, value)
    for use in (enabled, lambda: encrypt("x"), lambda: decrypt(MARKER + "x")):
        with pytest.raises(EncryptionKeyError) as caught:
            use()
        message = str(caught.value)
        assert f"{ENV} is malformed ({which})" in message
        assert "kagura keygen" in message
        for part in value.split(","):
            assert part not in message
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
    # Plaintext needs no key: it is read whatever the setting.
    assert decrypt("plain") == "plain"


def test_the_parsed_keys_are_cached_by_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[list[str]] = []
    real = _encryption._parse

    def counting(keys: list[str]) -> object:
        parsed.append(keys)
        return real(keys)

    monkeypatch.setattr(_encryption, "_parse", counting)
    first, second = generate_key(), generate_key()
    monkeypatch.setenv(ENV, first)
    for _ in range(3):
        encrypt("x")
    monkeypatch.setenv(ENV, second)  # read at every call: a new value is parsed
    sealed = encrypt("x")
    monkeypatch.setenv(ENV, first)
    with pytest.raises(EncryptionKeyError):
        decrypt(sealed)
    assert parsed == [[first], [second]]


def test_without_cryptography_a_key_asks_for_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.fernet", None)  # import fails
    monkeypatch.setattr(_encryption, "_ciphers", {})
    monkeypatch.setenv(ENV, Fernet.generate_key().decode())
    with pytest.raises(UsageError, match=r"pip install 'kagura\[encryption\]'") as caught:
        encrypt("x")
    assert ENV in str(caught.value)
    with pytest.raises(UsageError, match=r"pip install 'kagura\[encryption\]'"):
        generate_key()
    # Without a key nothing needs it: plaintext in, plaintext out.
    monkeypatch.delenv(ENV)
    assert encrypt("x") == "x" and decrypt("x") == "x"


def test_importing_kagura_or_the_module_does_not_import_cryptography() -> None:
    code = textwrap.dedent(
        """
        import sys
        import kagura
        import kagura._encryption
        from kagura._encryption import encrypt
        assert encrypt("x") == "x"
        print(",".join(m for m in sys.modules if m.split(".")[0] == "cryptography"))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != ENV},
    )
    assert out.stdout.strip() == ""


# -- kagura keygen ------------------------------------------------------------------------------


def test_keygen_prints_only_a_new_key_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen"]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and out.count("\n") == 1
    key = out.strip()
    Fernet(key)  # a valid key
    assert len(key) == 44
    # How to use it and rotate, on stderr, without the key itself.
    assert ENV in err and "rotate" in err and "comma-separated" in err
    assert key not in err
    assert 1 <= len(err.strip().splitlines()) <= 2
    assert main(["keygen"]) == 0
    assert capsys.readouterr().out.strip() != key


def test_keygen_output_works_as_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    # As `export KAGURA_ENCRYPTION_KEY=$(kagura keygen)` takes it: stdout, whitespace stripped.
    made = subprocess.run(
        [sys.executable, "-m", "kagura.cli", "keygen"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    monkeypatch.setenv(ENV, made.stdout.strip())
    assert decrypt(encrypt(SECRET)) == SECRET
    assert "KAGURA_ENCRYPTION_KEY" in made.stderr


def test_keygen_without_cryptography_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.fernet", None)
    assert main(["keygen"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("kagura: error: ") and err.count("\n") == 1
    assert "pip install 'kagura[encryption]'" in err


def test_keygen_is_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--help"]) == 0
    assert ENV in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "keygen" in capsys.readouterr().out


@pytest.mark.parametrize("value", [",", " , ", " "])
def test_a_setting_that_holds_no_key_is_an_error_not_plaintext(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # "$NEW,$OLD" with both unset: meant to encrypt, so nothing is written in plaintext.
    monkeypatch.setenv(ENV, value)
    with pytest.raises(EncryptionKeyError, match="is set but holds no key"):
        enabled()
    with pytest.raises(EncryptionKeyError):
        encrypt("x")
