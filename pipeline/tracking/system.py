"""System metrics of the node that trains (CPU, memory, disk, network, GPUs where present) into the train run.

MLflow's own monitors take the samples (`mlflow.system_metrics`: psutil, and `nvidia-ml-py` for NVIDIA GPUs)
and name them as its UI expects (`system/cpu_utilization_percentage`, `system/system_memory_usage_percentage`,
`system/gpu_0_utilization_percentage`, ...: the run's *System metrics* tab). They are sent through an outbox
of their own, from a thread of their own, every `interval_s` (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins) and
once more at `close()`, so even a short stage has a sample. Unlike MLflow's own monitor thread, which stops for
good at the first failed call, an outage queues them like any other metric and the loss is reported in a line.
"""

from __future__ import annotations

import threading
import time

from pipeline.tracking.outbox import Call, Outbox, fail_fast_http


class SystemMetrics(Outbox):
    """Samples the system in a thread and logs `system/*` metrics into `run_id` until `close()`."""

    def __init__(self, tracking_uri: str, run_id: str, *, interval_s: float = 10.0, max_pending_points: int = 20_000):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        from mlflow.tracking import MlflowClient

        fail_fast_http()
        super().__init__(tracking_uri, max_pending_points=max_pending_points, max_pending_calls=0)
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self._names[run_id] = "the system metrics of"  # the loss report reads "the system metrics of run <id>: ..."
        self._sampler = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri)
        self._sampler.collect_metrics()  # a baseline: CPU use is measured between two samples
        self._step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmpipe-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._sampler.sampling_interval):
            self._publish()

    def _publish(self) -> None:
        from mlflow.entities import Metric

        self._sampler.collect_metrics()
        values = self._sampler.aggregate_metrics()
        for monitor in self._sampler.monitors:
            monitor.clear_metrics()
        ts = int(time.time() * 1000)
        self._step += 1
        items = [Metric(f"system/{k}", float(v), ts, self._step) for k, v in values.items()]
        if items:
            self._submit(Call(self.run_id, "metrics", len(items), metrics=items))

    def close(self) -> str | None:
        """The last sample, then what is queued is sent (or reported, in one warning line)."""
        self._stop.set()
        self._thread.join(timeout=60)
        if not self._thread.is_alive():  # a send still hanging in the thread owns the outbox: leave it
            self._publish()
        return super().close()
