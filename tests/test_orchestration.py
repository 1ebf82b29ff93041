"""Orchestration: device slots, concurrency, retries and failure reports of `run_items`.

Device lists are faked (``cuda:0``, ``cuda:1``): the work functions only record which id they got.
"""
import errno
import threading
import time

import pytest
import torch
from prefect.runtime import flow_run, task_run

from pipeline.orchestration.devices import DeviceSlots, visible_devices
from pipeline.orchestration.flows import StageError, TransientError, is_transient, run_items


def recording_work(log: list, sleep_s: float):
    """A work function that sleeps and appends (device, start, end) to `log`."""

    def work(name, item, device):
        start = time.monotonic()
        time.sleep(sleep_s)
        log.append((device, start, time.monotonic()))
        return f"{name}:{item}"

    return work


def max_concurrent(log: list) -> int:
    events = sorted([(start, 1) for _, start, _ in log] + [(end, -1) for _, _, end in log])
    running = peak = 0
    for _, step in events:  # at equal times the end (-1) sorts first: touching intervals don't overlap
        running += step
        peak = max(peak, running)
    return peak


def counting_work(attempts: dict, fail):
    """A work function that counts attempts per item and raises `fail(name, attempt)` if not None."""
    lock = threading.Lock()

    def work(name, item, device):
        with lock:
            attempts[name] = attempts.get(name, 0) + 1
            attempt = attempts[name]
        exc = fail(name, attempt)
        if exc is not None:
            raise exc
        return flow_run.name, task_run.name, item

    return work


def test_two_fake_gpus_one_item_per_device():
    log: list = []
    items = {f"item{i}": i for i in range(6)}
    results = run_items("distill", items, recording_work(log, 0.2), devices=["cuda:0", "cuda:1"])

    assert results == {name: f"{name}:{i}" for name, i in items.items()}
    assert {device for device, _, _ in log} == {"cuda:0", "cuda:1"}
    assert max_concurrent(log) == 2  # parallel, but never more items than devices
    for device in ("cuda:0", "cuda:1"):
        assert max_concurrent([entry for entry in log if entry[0] == device]) == 1, device


def test_cpu_runs_items_one_at_a_time():
    log: list = []
    results = run_items("evaluate", {"a": 1, "b": 2, "c": 3}, recording_work(log, 0.1), devices=["cpu"])

    assert results == {"a": "a:1", "b": "b:2", "c": "c:3"}
    assert {device for device, _, _ in log} == {"cpu"}
    assert max_concurrent(log) == 1


def test_transient_error_is_retried_and_names_are_set():
    attempts: dict = {}
    fail = lambda name, attempt: TransientError("hub hiccup") if name == "flaky" and attempt == 1 else None
    results = run_items(
        "distill",
        {"flaky": 1, "steady": 2},
        counting_work(attempts, fail),
        devices=["cpu"],
        retry_delay_s=0,
        run_name="distill-digits-usps_to_mnist+printed_to_mnist",
    )

    assert attempts == {"flaky": 2, "steady": 1}
    assert results["flaky"] == ("distill-digits-usps_to_mnist+printed_to_mnist", "distill-flaky", 1)
    assert results["steady"][2] == 2


def test_deterministic_error_is_not_retried_is_reported_and_stops_the_items_not_started():
    attempts: dict = {}
    fail = lambda name, attempt: ValueError("bad config value") if name == "broken" else None
    with pytest.raises(StageError) as info:
        run_items("distill", {"done": 0, "broken": 1, "fine": 2, "also": 3}, counting_work(attempts, fail),
                  devices=["cpu"], retry_delay_s=0)

    # One CPU slot: items run in order; after the failure the two waiting items are not started (fail fast).
    assert attempts == {"done": 1, "broken": 1}
    message = str(info.value)
    assert "distill" in message and "broken: ValueError: bad config value" in message
    assert "not run: fine, also" in message and "done" not in message
    assert isinstance(info.value.failures["broken"], ValueError) and info.value.not_run == ["fine", "also"]


def test_a_transient_failure_being_retried_does_not_stop_other_items():
    attempts: dict = {}
    fail = lambda name, attempt: TransientError("busy") if name == "first" and attempt == 1 else None
    results = run_items("distill", {"first": 0, "second": 1}, counting_work(attempts, fail), devices=["cpu"],
                        retry_delay_s=0)
    assert set(results) == {"first", "second"} and attempts == {"first": 2, "second": 1}


def test_a_stop_request_cancels_the_running_item_at_its_next_step():
    from pipeline.progress import Cancelled, clear_stop, progress, request_stop

    steps = []

    def work(name, item, device):
        for i in progress(range(1000), desc=name):
            steps.append(i)
            if i == 3:
                request_stop()  # as the stage's Ctrl-C handler does, from another thread in real life
            time.sleep(0.001)

    try:
        with pytest.raises(Cancelled, match="were stopped"):
            run_items("distill", {"long": 0, "next": 1}, work, devices=["cpu"], retry_delay_s=0)
    finally:
        clear_stop()
    assert steps == [0, 1, 2, 3]  # stopped at the next step, and "next" never ran


def test_transient_error_gives_up_after_the_retries():
    attempts: dict = {}
    with pytest.raises(StageError, match="always-busy.*TimeoutError"):
        run_items(
            "shard", {"always-busy": 0}, counting_work(attempts, lambda *_: TimeoutError("still busy")),
            devices=["cpu"], retries=1, retry_delay_s=0,
        )
    assert attempts == {"always-busy": 2}


@pytest.mark.parametrize(
    "exc, expected",
    [
        (TransientError("retry me"), True),
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), True),
        (TimeoutError("read timed out"), True),
        (ConnectionResetError("peer reset"), True),
        (OSError(errno.EAGAIN, "try again"), True),
        (OSError(errno.EBUSY, "device busy"), True),
        (OSError(errno.ETIMEDOUT, "timed out"), True),
        (OSError(errno.ENOSPC, "disk full"), False),
        (FileNotFoundError(errno.ENOENT, "missing"), False),
        (ValueError("bad value"), False),
        (KeyError("missing key"), False),
        (AssertionError("broken invariant"), False),
        (RuntimeError("generic"), False),
    ],
)
def test_is_transient(exc, expected):
    assert is_transient(exc) is expected


def test_visible_devices_policies(monkeypatch):
    with pytest.raises(ValueError, match="'tpu'.*auto, cpu, cuda"):
        visible_devices("tpu")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert visible_devices("auto") == ["cpu"]
    assert visible_devices("cpu") == ["cpu"]
    with pytest.raises(RuntimeError, match="no GPU is visible"):
        visible_devices("cuda")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert visible_devices("auto") == visible_devices("cuda") == ["cuda:0", "cuda:1"]
    assert visible_devices("cpu") == ["cpu"]


def test_device_slot_is_returned_after_an_error():
    slots = DeviceSlots(["cuda:0"])
    with pytest.raises(KeyError):
        with slots.acquire():
            raise KeyError("boom")
    with slots.acquire() as device:  # would block forever if the slot had leaked
        assert device == "cuda:0"
