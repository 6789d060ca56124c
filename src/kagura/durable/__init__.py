"""Durable workflow runs: resume after a crash without repeating paid LLM calls.

``@workflow(durable=True)`` journals each completed agent call, tool call and :func:`step` of a
run in the event store. ``await wf.run(..., run_id="order-42")`` is idempotent per run id, and
``await wf.resume(run_id)`` (or ``kagura runs resume ID``) finishes a run in any process, taking
journaled steps from the journal. Runs whose process died are detected by their expired lease
(``KAGURA_LEASE_SECONDS``, default 30) and listed as interrupted by ``kagura runs list``.
"""

from ._execute import import_target
from ._journal import Journal, RunRecord, StepRecord, journal_for, lease_seconds
from ._run import DurableRun, input_hash, step

__all__ = [
    "DurableRun",
    "Journal",
    "RunRecord",
    "StepRecord",
    "import_target",
    "input_hash",
    "journal_for",
    "lease_seconds",
    "step",
]
