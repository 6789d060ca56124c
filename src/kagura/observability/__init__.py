"""Observability: every workflow run, agent call, LLM attempt and tool call, recorded.

Recording is automatic: the first agent or workflow call starts a recorder that writes to
``KAGURA_DB`` (a SQLite path or a ``postgresql://`` URL), else ``KAGURA_HOME/events.db``
(``~/.kagura/events.db``). ``KAGURA_RECORD=0`` turns it off; ``KAGURA_RECORD_CONTENT=hash`` or
``none`` keeps prompts and outputs out of the store. Query it with :class:`EventStore`, or from the
terminal with ``kagura monitor``.
"""

from ._recorder import Recorder, default_recorder, install_default, uninstall_default
from ._store import EventStore

__all__ = ["EventStore", "Recorder", "default_recorder", "install_default", "uninstall_default"]
