"""The journal at rest (``KAGURA_ENCRYPTION_KEY``): a durable run's arguments, step outputs,
result and error are encrypted in the store, so secrets a user passes in are nowhere in the
store's files (SQLite's WAL included, PostgreSQL's files after a checkpoint); resume and replay
read them with the key; a missing or wrong key is a clear error, never garbage. The provider's
API key is never stored, with a key or without.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

import kagura
from kagura import agent, observability, workflow
from kagura._encryption import generate_key, is_encrypted
from kagura._redact import looks_secret
from kagura.cli import main
from kagura.durable import Journal
from kagura.errors import EncryptionKeyError, RunFailedError
from kagura.observability import Recorder
from kagura.testing import replay
from kagura.testing.fault_server import FaultServer
from tests.observability.test_encryption import found_on_disk

ENV = "KAGURA_ENCRYPTION_KEY"
#: The provider's key: key-shaped, so the span tables would redact it anyway; it must not reach
#: the journal either, where nothing is redacted.
PROVIDER_KEY = "sk-proj-" + "Q7x" * 12


@agent(model="openai/test-model", api_key=PROVIDER_KEY, retry=False)
async def note(text: str) -> str:
    """NOTE {{ text }}"""


def sealed(text: str, gate: str) -> str:
    """A step whose output holds a secret of its own; fails while ``gate`` is missing."""
    if not Path(gate).exists():
        raise RuntimeError(f"the vault refused {text}")
    return f"stored {text}"


@workflow(durable=True)
async def vault(password: str, gate: str) -> str:
    first = await note(password)
    second = await kagura.step("seal", sealed, f"{password}-sealed", gate)
    return f"{first} | {second}"


def secret() -> str:
    """A secret no redaction catches (not key-shaped, no key-like word), with a tag of its own:
    PostgreSQL's WAL is shared by the tests of a session."""
    made = f"hunter2-correct-horse-{uuid.uuid4().hex[:10]}"
    assert not looks_secret(made)
    return made


async def test_with_a_key_the_journal_holds_no_secret_and_resume_reads_it(
    journal: Journal,
    db: str,
    server: FaultServer,
    record_to: Callable[..., Recorder],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = generate_key()
    monkeypatch.setenv(ENV, key)
    record_to(db, KAGURA_ENCRYPTION_KEY=key)
    password, gate = secret(), tmp_path / "gate"

    # The step fails with the secret in its error: the run is failed, its error journaled.
    with pytest.raises(RuntimeError, match="the vault refused"):
        await vault.run(password, str(gate), run_id="vault-1")
    gate.touch()
    expected = f"NOTE {password} | stored {password}-sealed"
    assert await vault.resume("vault-1") == expected  # the arguments and the step read back
    assert await replay("vault-1") == expected
    observability.uninstall_default()

    # Nowhere in the files: arguments, the agent's output, the step's output, the error, the
    # result; nor the provider's key.
    assert found_on_disk(db, password, PROVIDER_KEY, "vault") == {"vault"}
    with journal.engine.connect() as connection:
        stored = connection.exec_driver_sql(
            "SELECT arguments, result, error FROM kagura_runs WHERE run_id = 'vault-1'"
        ).one()
        outputs = (
            connection.exec_driver_sql("SELECT output FROM kagura_steps WHERE run_id = 'vault-1'")
            .scalars()
            .all()
        )
    assert is_encrypted(stored.arguments) and is_encrypted(stored.result)
    assert stored.error is None  # the resumed run completed
    assert len(outputs) == 2 and all(is_encrypted(o) for o in outputs)
    # The provider was called with its key, once: the journaled call was not sent again.
    assert [r.authorized_with(PROVIDER_KEY) for r in server.chat_requests] == [True]

    # Without the key, or with another: a clear error, never ciphertext shown as data.
    for setting in (None, generate_key()):
        if setting is None:
            monkeypatch.delenv(ENV)
        else:
            monkeypatch.setenv(ENV, setting)
        with pytest.raises(EncryptionKeyError, match=f"durable run 'vault-1'.*{ENV}"):
            journal.get_run("vault-1")
        with pytest.raises(EncryptionKeyError, match=ENV):
            journal.load_steps("vault-1")
        code, out, err = run_cli(capsys, "runs", "show", "vault-1")
        assert code == 1 and err.startswith("kagura: error: cannot read") and ENV in err
        assert password not in out + err and "kagura:enc1:" not in out + err
        code, out, _ = run_cli(capsys, "runs", "list")  # what needs no key is listed
        assert code == 0 and "vault-1" in out and "completed" in out


async def test_a_failed_run_error_is_encrypted_and_listed_without_the_key(
    journal: Journal,
    db: str,
    server: FaultServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(ENV, generate_key())
    password = secret()
    with pytest.raises(RuntimeError):
        await vault.run(password, str(tmp_path / "closed"), run_id="vault-2")
    with pytest.raises(RunFailedError, match=f"the vault refused {password}-sealed"):
        await vault.run(password, str(tmp_path / "closed"), run_id="vault-2")
    monkeypatch.delenv(ENV)
    (listed,) = journal.list_runs(status="failed")
    assert listed.run_id == "vault-2" and listed.error_type == "RuntimeError"
    assert listed.error is not None and f"set {ENV}" in listed.error
    code, out, _ = run_cli(capsys, "runs", "list")
    assert code == 0 and "vault-2" in out and password not in out


async def test_without_a_key_the_provider_key_is_not_stored_either(
    journal: Journal, db: str, server: FaultServer, tmp_path: Path
) -> None:
    password = secret()
    (tmp_path / "gate").touch()
    await vault.run(password, str(tmp_path / "gate"), run_id="vault-3")
    observability.uninstall_default()
    # The journal keeps what resume needs, in plain text without a key; never the API key.
    assert found_on_disk(db, password, PROVIDER_KEY) == {password}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_a_resume_with_the_wrong_key_leaves_the_run_resumable_at_once(
    journal: Journal, db: str, server: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = generate_key()
    monkeypatch.setenv(ENV, key)
    gate = tmp_path / "gate"
    with pytest.raises(RuntimeError, match="the vault refused"):
        await vault.run(secret(), str(gate), run_id="vault-keys")
    gate.touch()

    # Claimed, then found unreadable: given up at once, not held by this live process until
    # its lease runs out.
    monkeypatch.setenv(ENV, generate_key())
    with pytest.raises(EncryptionKeyError, match=ENV):
        await vault.resume("vault-keys")
    monkeypatch.setenv(ENV, key)
    assert (await vault.resume("vault-keys")).startswith("NOTE ")
