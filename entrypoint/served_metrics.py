"""vLLM's Prometheus metrics made this start's, when a restored server opens its gate.

The checkpoint holds the API server's metrics as the bake left them, so a restored server would
report the bake's warm-up requests and this start's probe as served (`vllm:request_success_total`,
token counts, latency histograms) and, from the process collector, a start time computed with the
bake machine's boot time. Opening the gate is, for monitoring, the process's start: counters and
histograms go back to zero in place (vLLM holds their labelled children: they keep counting and
exporting), each with a new `_created`; gauges (requests running, KV cache use) are the current
state and stay; the process collector is made anew here. prometheus_client offers no public way to
list a registry's metrics or to zero a histogram, so this reads its long-stable internals, and
anything it does not recognise is left as it was and named in the answer."""

from __future__ import annotations

import time
from typing import Any, Optional


def zero_served_counts(registry: Optional[Any] = None) -> dict:
    """Zero every counter, histogram and summary in REGISTRY (prometheus_client's default one)
    and renew its process collector; returns what was done, and what was not, for the log."""
    try:
        import prometheus_client
        from prometheus_client import metrics, process_collector
    except ImportError:
        return {"skipped": "no prometheus_client in the server"}
    registry = registry or prometheus_client.REGISTRY
    done = {"counters": 0, "histograms": 0, "summaries": 0}
    not_zeroed: list[str] = []
    collectors = list(getattr(registry, "_collector_to_names", {}) or {})
    now = time.time()
    for collector in collectors:
        if not isinstance(collector, (metrics.Counter, metrics.Histogram, metrics.Summary)):
            continue
        try:
            children = list(collector._metrics.values()) if collector._is_parent() else [collector]
            for child in children:
                if isinstance(child, metrics.Counter):
                    child.reset()
                    done["counters"] += 1
                elif isinstance(child, metrics.Histogram):
                    child._sum.set(0)
                    for bucket in child._buckets:
                        bucket.set(0)
                    child._created = now
                    done["histograms"] += 1
                else:
                    child._count.set(0)
                    child._sum.set(0)
                    child._created = now
                    done["summaries"] += 1
        except (AttributeError, TypeError) as e:  # another prometheus_client's internals
            not_zeroed.append(f"{getattr(collector, '_name', collector)}: {e}")
    if process_collector.PROCESS_COLLECTOR in collectors:
        registry.unregister(process_collector.PROCESS_COLLECTOR)
        process_collector.PROCESS_COLLECTOR = process_collector.ProcessCollector(registry=registry)
        done["process_collector"] = "renewed"
    if not collectors:
        not_zeroed.append("the registry's metrics could not be listed")
    if not_zeroed:
        done["not_zeroed"] = not_zeroed
    return done
