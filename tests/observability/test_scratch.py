import time
from kagura.observability import EventStore, Recorder
from kagura._events import SpanStarted, SpanFinished
from kagura._usage import Usage

def test_day(store_url):
    t = 1_700_000_000  # 2023-11-14 22:13:20 UTC
    rec = Recorder(EventStore(store_url).url)
    ns = t * 10**9
    rec.handle(SpanStarted("s1", None, "s1", "llm", "m", "m", ns, {"model": "p/m"}))
    rec.handle(SpanFinished("s1", None, "s1", "llm", "m", "m", ns, ns + 10**6, "completed", usage=Usage(1, 2), cost_usd=0.5))
    rec.close()
    print(EventStore(store_url).cost(by="day"))
    assert EventStore(store_url).cost(by="day")[0]["day"] == "2023-11-14"
