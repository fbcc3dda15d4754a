"""served_metrics with real prometheus_client metrics, held the way vLLM holds them (labelled
children kept in its stat logger): after the zeroing the counts are this start's, the same
children still count and are exported, gauges keep the current state, the process collector's
start time is this process's."""

import time

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary  # noqa: E402

from fvboot.served_metrics import zero_served_counts  # noqa: E402


def _value(registry, name, **labels):
    return registry.get_sample_value(name, labels or None)


def test_counts_are_zeroed_in_place_and_keep_counting():
    reg = CollectorRegistry()
    success = Counter("vllm:request_success", "d", ["finished_reason"], registry=reg)
    stop = success.labels("stop")  # what vLLM's stat logger keeps and increments
    stop.inc(14)
    tokens = Counter("vllm:prompt_tokens", "d", registry=reg)
    tokens.inc(282)
    ttft = Histogram("vllm:time_to_first_token_seconds", "d", ["model_name"], registry=reg, buckets=(0.1, 1.0))
    child = ttft.labels("m")
    child.observe(0.05)
    child.observe(0.5)
    lat = Summary("lat", "d", registry=reg)
    lat.observe(3)
    running = Gauge("vllm:num_requests_running", "d", registry=reg)
    running.set(2)
    before = _value(reg, "vllm:request_success_created", finished_reason="stop")
    time.sleep(0.01)

    done = zero_served_counts(reg)

    assert done == {"counters": 2, "histograms": 1, "summaries": 1}
    assert _value(reg, "vllm:request_success_total", finished_reason="stop") == 0
    assert _value(reg, "vllm:prompt_tokens_total") == 0
    assert _value(reg, "vllm:time_to_first_token_seconds_count", model_name="m") == 0
    assert _value(reg, "vllm:time_to_first_token_seconds_bucket", model_name="m", le="1.0") == 0
    assert _value(reg, "vllm:time_to_first_token_seconds_sum", model_name="m") == 0
    assert _value(reg, "lat_count") == 0 and _value(reg, "lat_sum") == 0
    assert _value(reg, "vllm:num_requests_running") == 2  # the current state, not a count
    assert _value(reg, "vllm:request_success_created", finished_reason="stop") > before
    stop.inc()  # the child vLLM holds is still the one exported
    child.observe(0.5)
    assert _value(reg, "vllm:request_success_total", finished_reason="stop") == 1
    assert _value(reg, "vllm:time_to_first_token_seconds_bucket", model_name="m", le="1.0") == 1
    assert _value(reg, "vllm:time_to_first_token_seconds_bucket", model_name="m", le="0.1") == 0


def test_the_process_collector_is_made_anew_with_this_machines_boot_time(monkeypatch):
    from prometheus_client import process_collector

    reg = CollectorRegistry()
    stale = process_collector.ProcessCollector(registry=reg)
    if not stale._btime:
        pytest.skip("no /proc/stat here")
    stale._btime -= 86400  # as if read on the bake's machine, booted a day earlier
    monkeypatch.setattr(process_collector, "PROCESS_COLLECTOR", stale)
    wrong = _value(reg, "process_start_time_seconds")

    done = zero_served_counts(reg)

    assert done["process_collector"] == "renewed"
    now = _value(reg, "process_start_time_seconds")
    assert abs(now - wrong - 86400) < 2 and now <= time.time()


def test_metrics_it_does_not_know_are_named_and_left_alone():
    reg = CollectorRegistry()
    broken = Counter("odd", "d", registry=reg)
    broken.reset = None  # another prometheus_client's internals
    Counter("fine", "d", registry=reg).inc(3)

    done = zero_served_counts(reg)

    assert done["counters"] == 1 and done["not_zeroed"][0].startswith("odd:")
    assert _value(reg, "fine_total") == 0
