"""Runs or resumes a durable run in a fresh process, for the multi-process tests::

    python -m tests.durable.runner run WORKFLOW RUN_ID ARGS_JSON
    python -m tests.durable.runner many WORKFLOW PREFIX COUNT ARGS_JSON
    python -m tests.durable.runner resume RUN_ID
    python -m tests.durable.runner recover

``many`` starts COUNT runs at once, ``PREFIX-0``, ``PREFIX-1``, ..., the first argument (a
topic) of each ending with its number. ``resume`` finds the workflow from the target the run
recorded, as ``kagura runs resume`` does; ``recover`` resumes every interrupted run of this host
(``kagura.durable.recover``) and prints ``[run id, outcome]`` pairs.
Prints one JSON line: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": TYPE, ...}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from kagura.durable import journal_for, recover
from kagura.durable._execute import import_target
from kagura.errors import KaguraError

from . import workflows


async def main(argv: list[str]) -> Any:
    if argv[0] == "run":
        flow = getattr(workflows, argv[1])
        return await flow.run(*json.loads(argv[3]), run_id=argv[2])
    if argv[0] == "many":
        flow, prefix, count = getattr(workflows, argv[1]), argv[2], int(argv[3])
        topic, *rest = json.loads(argv[4])
        return await asyncio.gather(
            *(flow.run(f"{topic}{n}", *rest, run_id=f"{prefix}-{n}") for n in range(count))
        )
    if argv[0] == "resume":
        record = await asyncio.to_thread(journal_for().get_run, argv[1])
        if record is None or record.target is None:
            raise SystemExit(f"no run {argv[1]!r} with a target")
        return await import_target(record.target).resume(argv[1])
    if argv[0] == "recover":
        return [[o.run_id, o.outcome] for o in await recover()]
    raise SystemExit(f"unknown action {argv[0]!r}")


if __name__ == "__main__":
    try:
        outcome: dict[str, Any] = {"ok": True, "result": asyncio.run(main(sys.argv[1:]))}
    except KaguraError as exc:
        outcome = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    outcome["pid"] = os.getpid()
    print(json.dumps(outcome), flush=True)
    sys.exit(0 if outcome["ok"] else 3)
