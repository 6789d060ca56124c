"""Secrets written as free text (an exception's message, a prompt, a tool's argument) are
redacted before they are stored, and ordinary text that shares their words is not."""

from __future__ import annotations

import pytest

from kagura._redact import looks_secret, redact_text


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        # An environment variable's name ends in a secret's: the "_" before it is a word
        # character, so a name that only started at a word boundary never matched these.
        ("config: DB_PASSWORD=hunter2-db", "config: DB_PASSWORD=[REDACTED]"),
        ("export AZURE_OPENAI_API_KEY=0a1b2c3d4e5f", "export AZURE_OPENAI_API_KEY=[REDACTED]"),
        ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG", "AWS_SECRET_ACCESS_KEY=[REDACTED]"),
        ("sent access_token=ya29.a0Af", "sent access_token=[REDACTED]"),
        # A URL's password with no user before it (Redis's usual form).
        ("redis://:redis-pw@cache:6379/0", "redis://:[REDACTED]@cache:6379/0"),
        # Bearer tokens in every character RFC 6750 allows, base64's + / and = among them.
        ("Bearer Ab+cd/xyzXYZ0123456789==", "[REDACTED]"),
        ("Authorization: Bearer Ab+cd/xyz==", "Authorization: Bearer [REDACTED]"),
        # Basic authorization, after the header's name (Basic alone is an ordinary word).
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "Authorization: Basic [REDACTED]"),
        ('{"authorization": "basic dXNlcjpwYXNz"}', '{"authorization": "basic [REDACTED]"}'),
        # As before.
        ("api_key=abcd1234 and more", "api_key=[REDACTED] and more"),
        ("postgresql://bob:pw-1234@db/x", "postgresql://bob:[REDACTED]@db/x"),
        ("Bearer abcdefghijkl.mnop", "[REDACTED]"),
        ("export HF_TOKEN=hf_AbCdEf123456", "export HF_TOKEN=[REDACTED]"),
    ],
)
def test_secrets_in_text_are_redacted_and_their_names_stay(text: str, redacted: str) -> None:
    assert looks_secret(text)  # else the writer's fast path stores it as it is
    assert redact_text(text) == redacted


@pytest.mark.parametrize(
    "text",
    [
        "at 10:30, see https://example.com/a:b",
        "max_tokens=1000, prompt_tokens: 1234, tokens: 5, a_token_count: 5000",
        "Basic authentication is supported; Authorization header required",
        "authorization: required",
        "the bearer of bad news; Bearer tokens are sent as headers",
        "the password_hash column; DB_PASSWORD_FILE=/run/secrets/db",
        "mytoken=abcdef",
        "ssh://git@github.com:org/repo and mailto:me@example.com",
        "use http://host:8080/path@v2 or http://[::1]:8080/x",
        # Tokenizers' special tokens and counts, everyday in an LLM library's outputs.
        "tokenizer.pad_token = tokenizer.eos_token",
        'tokenizer(text, eos_token="</s>", pad_token="<pad>", bos_token="<s>")',
        "set max_token=4096; usage prompt_token: 1234, completion_token: 56",
        "Bearer tokens/credentials are explained in RFC 6750",
    ],
)
def test_ordinary_text_that_shares_their_words_stays(text: str) -> None:
    assert redact_text(text) == text
