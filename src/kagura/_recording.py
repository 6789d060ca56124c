"""Recording on by default: the first agent or workflow call starts the event store's recorder.

Kept apart from :mod:`kagura._instrument` (where records go) so that instrumentation does not
depend on the event store: the recorder imports instrumentation and registers itself as a sink,
never the other way round.
"""

from __future__ import annotations

import threading

from . import _instrument, _settings

_installing = threading.RLock()


def ensure_recording() -> None:
    """Install the default recorder on the first agent or workflow call, unless turned off.

    Deferred to the first call so that ``import kagura`` stays light; after that every call
    returns at once. Checked only once the recorder is in place: the first calls of other
    threads wait for it meanwhile, rather than run unrecorded (or recorded without what they
    started with)."""
    if _instrument.recording_checked():
        return
    with _installing:
        if _instrument.recording_checked():
            return
        try:
            if _settings.recording_enabled():
                from .observability._recorder import install_default

                install_default()
        finally:
            _instrument.mark_recording_checked()
