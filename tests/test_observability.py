"""A pool's progress reaches Ray's metrics endpoint (what the dashboard's Metrics view and Prometheus read)."""
import re
import tempfile
import time
import urllib.request

from selfexplain.distributed.actor_pool import run_pool


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def _value(text: str, name: str, stage: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'stage="{stage}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_pool_progress_is_exported_as_ray_metrics():
    import ray

    ray.init(num_cpus=2, _temp_dir=tempfile.mkdtemp(prefix="se-ray-"),
             _system_config={"metrics_report_interval_ms": 500})
    try:
        @ray.remote(num_cpus=0.5)
        class Doubler:
            def work(self, unit: list[int]) -> list[int]:
                return [2 * x for x in unit]

        units = [[1, 2], [3], [4, 5, 6]]
        run_pool(make_actor=Doubler.remote, n_actors=2, units=units, call=lambda actor, unit: actor.work.remote(unit),
                 on_result=lambda unit, result: len(result), max_retries=0, desc="metrics test")
        port = ray._private.worker.global_worker.node.metrics_export_port
        deadline, text = time.time() + 60, ""
        while time.time() < deadline:
            text = _scrape(port)
            if _value(text, "ray_selfexplain_units_done", "metrics test") == 3:
                break
            time.sleep(0.5)
        assert _value(text, "ray_selfexplain_units_done", "metrics test") == 3, text[-2000:]
        assert _value(text, "ray_selfexplain_units_total", "metrics test") == 3
        assert _value(text, "ray_selfexplain_records_total", "metrics test") == 6
        assert _value(text, "ray_selfexplain_records_per_second", "metrics test") > 0
        assert re.search(r"# HELP ray_selfexplain_records_per_second", text)
    finally:
        ray.shutdown()
