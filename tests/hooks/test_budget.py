"""The rate budget shared through Redis (hooks/budget.py), against the real Redis on 127.0.0.1:6379.

Each test uses a key prefix of its own and deletes only the keys under it. What is checked: the bucket never
lets a 1-second or 60-second window hold more than the documented burst or steady count (the sandbox's fixed
windows, as Klaviyo counts); two processes drawing from one bucket share it; four hooks on one key, each pacing
as if alone, are not refused by the sandbox and together reach the key's limit; Mailchimp's connection cap is
one semaphore for all, and a dead holder's slot expires; a Redis that stops answering falls back to per-process
pacing; the API key is never in a Redis key.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
from segment_export_sandbox import KLAVIYO_API_KEY, KLAVIYO_LIST_ID, MAILCHIMP_API_KEY

from segment_export.hooks import budget as shared
from segment_export.hooks.budget import Bucket, RateBudget

redis = pytest.importorskip("redis")

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def client():
    c = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        c.ping()
    except redis.RedisError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Redis not reachable: {exc}")
    yield c
    c.close()


@pytest.fixture
def prefix(client):
    """A key prefix of this test's own; only its keys are deleted afterwards."""
    name = f"segment_export:test:{uuid.uuid4().hex[:12]}"
    yield name
    for key in client.scan_iter(match=f"{name}:*"):
        client.delete(key)


@pytest.fixture
def budget_conn(airflow_conn, prefix, monkeypatch):
    """A Redis connection ``rate_budget`` with this test's prefix, named as the deployment's budget."""
    airflow_conn("rate_budget", conn_type="redis", host="127.0.0.1", port=6379, extra=json.dumps({"key_prefix": prefix}))
    monkeypatch.setenv("AIRFLOW__SEGMENT_EXPORT__RATE_BUDGET_CONN_ID", "rate_budget")
    shared._clients.clear()
    yield "rate_budget"
    shared._clients.clear()


def _most_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    most, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        most = max(most, end - start + 1)
    return most


@pytest.mark.parametrize("burst, steady", [(10, 150), (75, 750), (1, 15), (3, 60)])
def test_the_bucket_never_puts_more_than_burst_in_a_second_nor_steady_in_a_minute(burst, steady):
    bucket = Bucket.for_limits(burst, steady)
    assert bucket.depth >= 1 and bucket.refill >= 0.9 * steady / 60
    # The bucket's own schedule, from full: depth at once, then one every 1/refill seconds.
    times = [0.0] * int(bucket.depth) + [(i + 1) / bucket.refill for i in range(3 * steady)]
    assert _most_in_window(times, 1.0) <= burst and _most_in_window(times, 60.0) <= steady


def test_reservations_from_redis_follow_the_bucket_in_order(client, prefix):
    budget = RateBudget(client, "klaviyo", "pk_test", {"bulk-import": (10, 150)}, prefix=prefix)
    waits = [budget.reserve("bulk-import") for _ in range(40)]
    depth, refill = budget.buckets["bulk-import"].depth, budget.buckets["bulk-import"].refill
    assert waits[: int(depth)] == [0.0] * int(depth)
    assert waits == sorted(waits)  # first asked, first served
    assert waits[-1] == pytest.approx((40 - depth) / refill, abs=0.2)
    sends = [time.time() + w for w in waits]
    assert _most_in_window(sends, 1.0) <= 10


def _draw(prefix: str, count: int, out) -> None:
    """A process of its own drawing ``count`` requests from the shared bucket, sending each when told."""
    client = redis.Redis.from_url(REDIS_URL)
    budget = RateBudget(client, "klaviyo", "pk_shared", {"lists": (10, 300)}, prefix=prefix)
    sent = []
    for _ in range(count):
        time.sleep(budget.reserve("lists"))
        sent.append(time.time())
    out.put(sent)


def test_two_processes_share_one_bucket(client, prefix):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_draw, args=(prefix, 12, out)) for _ in range(2)]
    for p in procs:
        p.start()
    sent = [t for _ in procs for t in out.get(timeout=60)]
    for p in procs:
        p.join(10)
    bucket = Bucket.for_limits(10, 300)
    assert _most_in_window(sent, 1.0) <= 10  # together within the burst...
    # ...and at the bucket's pace together: 24 requests take (24 - depth) / refill, not half of it (alone each).
    assert max(sent) - min(sent) >= 0.9 * (24 - bucket.depth) / bucket.refill


def test_retry_after_and_ratelimit_headers_hold_every_worker(client, prefix):
    budget = RateBudget(client, "klaviyo", "pk_test", {"lists": (75, 750)}, prefix=prefix)
    assert budget.reserve("lists") == 0.0
    budget.observe("lists", {}, retry_after=2.0)  # a 429's Retry-After, seen by one worker
    other = RateBudget(client, "klaviyo", "pk_test", {"lists": (75, 750)}, prefix=prefix)
    assert 1.5 < other.reserve("lists") <= 2.1
    budget.observe("lists", {"RateLimit-Remaining": "0", "RateLimit-Reset": "5"})  # the window is spent
    assert 4.5 < other.reserve("lists") <= 5.1


def test_the_api_key_is_never_in_a_redis_key(client, prefix):
    budget = RateBudget(client, "mailchimp", MAILCHIMP_API_KEY, {"x": (10, 150)}, connections=10, prefix=prefix)
    budget.reserve("x")
    token = budget.acquire_slot()
    keys = [k.decode() for k in client.scan_iter(match=f"{prefix}:*")]
    assert len(keys) == 2 and not any(MAILCHIMP_API_KEY in k or MAILCHIMP_API_KEY.split("-")[0] in k for k in keys)
    assert MAILCHIMP_API_KEY not in repr(budget)
    budget.release_slot(token)


def test_the_connection_semaphore_caps_holders_across_threads(client, prefix):
    budgets = [RateBudget(client, "mailchimp", "k-us6", {}, connections=3, prefix=prefix) for _ in range(4)]
    held, most, lock = [0], [0], threading.Lock()

    def work(budget: RateBudget) -> None:
        for _ in range(5):
            token = budget.acquire_slot()
            with lock:
                held[0] += 1
                most[0] = max(most[0], held[0])
            time.sleep(0.02)
            with lock:
                held[0] -= 1
            budget.release_slot(token)

    threads = [threading.Thread(target=work, args=(b,)) for b in budgets for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert most[0] == 3 and budgets[0].slots_in_use() == 0


HOLDER = textwrap.dedent("""
    import sys, time, redis
    from segment_export.hooks.budget import RateBudget
    budget = RateBudget(redis.Redis.from_url(sys.argv[1]), "mailchimp", "k-us6", {}, connections=2,
                        prefix=sys.argv[2], slot_ttl=float(sys.argv[3]))
    budget.acquire_slot(); budget.acquire_slot()
    print("held", flush=True)
    time.sleep(600)
""")


def test_a_dead_holders_slots_expire_and_a_live_holder_keeps_its_own(client, prefix):
    ttl = 1.0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, REDIS_URL, prefix, str(ttl)], stdout=subprocess.PIPE,
                              env=env, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == b"held"
        budget = RateBudget(client, "mailchimp", "k-us6", {}, connections=2, prefix=prefix, slot_ttl=ttl)
        time.sleep(2.5 * ttl)  # well past the slots' lifetime: the live holder renewed them
        assert budget.try_acquire_slot() is None and budget.slots_in_use() == 2
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # the worker dies holding both slots
        holder.wait(10)
    died = time.monotonic()
    token = budget.acquire_slot()
    assert time.monotonic() - died <= ttl + 0.5  # free once they expire, no later
    budget.release_slot(token)


def test_four_klaviyo_hooks_on_one_key_share_its_limit_and_are_not_refused(sandbox, budget_conn):
    """Four exports' hooks (own processes' limiters, as on four workers), 160 list reads at once: the sandbox
    refuses none (it counts per key, as Klaviyo does) and together they read at the key's documented pace."""
    from segment_export.destinations.klaviyo.hook import KlaviyoHook

    hooks = [KlaviyoHook() for _ in range(4)]
    for hook in hooks:
        hook.session  # reads the connection, and with it the budget
        assert hook.budget is not None

    def work(hook: KlaviyoHook) -> None:
        for _ in range(40):
            hook.get_list(KLAVIYO_LIST_ID)

    threads = [threading.Thread(target=work, args=(h,)) for h in hooks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    (account,) = [v for k, v in sandbox.state()["requests"]["by_account"].items() if k.startswith("klaviyo ")]
    assert account["refused"] == {}
    reads = account["admitted"]["GET /api/lists/{id}"]
    assert reads["count"] == 160 and sum(h.retries for h in hooks) == 0
    steady = 750 / 60  # lists: 75/s burst, 750/min steady
    rate = (reads["count"] - 1) / (reads["last"] - reads["first"])
    assert rate >= 0.8 * steady, rate


def test_without_the_budget_four_hooks_on_one_key_are_refused(sandbox):
    """The contrast: four hooks pacing themselves (no Redis connection) each send their first GET /api/accounts
    (1/s burst) at once, as each may alone: the key's limit refuses the ones over it."""
    from segment_export.destinations.klaviyo.hook import KlaviyoHook

    hooks = [KlaviyoHook() for _ in range(4)]
    for hook in hooks:
        hook.session
    start = threading.Barrier(len(hooks))

    def work(hook: KlaviyoHook) -> None:
        start.wait()
        hook.request_json("GET", "/api/accounts", limit_key="accounts")

    threads = [threading.Thread(target=work, args=(h,)) for h in hooks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(h.budget is None for h in hooks)
    (account,) = [v for k, v in sandbox.state()["requests"]["by_account"].items() if k.startswith("klaviyo ")]
    assert account["refused"].get("GET /api/accounts", 0) >= 1 and sum(h.retries for h in hooks) >= 1


def test_four_mailchimp_hooks_on_one_key_hold_at_most_ten_connections(sandbox, budget_conn):
    from segment_export.destinations.mailchimp.hook import MailchimpHook

    sandbox.configure(latency={"mailchimp_read": 0.05})
    try:
        hooks = [MailchimpHook() for _ in range(4)]

        def work(hook: MailchimpHook) -> None:
            for _ in range(6):
                hook.request_json("GET", "/ping")

        threads = [threading.Thread(target=work, args=(h,)) for h in hooks for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sandbox.configure(latency={"mailchimp_read": 0.0})
    (account,) = [v for k, v in sandbox.state()["requests"]["by_account"].items() if k.startswith("mailchimp ")]
    assert account["refused"] == {} and account["max_in_flight"] == 10
    assert account["admitted"]["GET /3.0/ping"]["count"] == 240
    assert all(h.adaptive_limit.cuts == 0 for h in hooks) and hooks[0].budget.slots_in_use() == 0


def test_a_redis_that_does_not_answer_falls_back_to_pacing_per_process(sandbox, airflow_conn, monkeypatch, capsys):
    from segment_export.destinations.klaviyo.hook import KlaviyoHook

    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    airflow_conn("rate_budget", conn_type="redis", host="127.0.0.1", port=dead_port)
    monkeypatch.setenv("AIRFLOW__SEGMENT_EXPORT__RATE_BUDGET_CONN_ID", "rate_budget")
    shared._clients.clear()
    try:
        hook = KlaviyoHook()
        assert hook.get_list(KLAVIYO_LIST_ID)["id"] == KLAVIYO_LIST_ID
    finally:
        shared._clients.clear()
    logged = capsys.readouterr().out  # Airflow's structured log goes to stdout here
    assert hook.budget is None and "shared rate budget is unreachable" in logged
    assert KLAVIYO_API_KEY not in logged


def test_which_redis_connection_a_destination_connection_uses(monkeypatch):
    class Conn:
        def __init__(self, extra):
            self.extra_dejson = extra

    monkeypatch.delenv("AIRFLOW__SEGMENT_EXPORT__RATE_BUDGET_CONN_ID", raising=False)
    assert shared.configured_conn_id(Conn({})) is None
    monkeypatch.setenv("AIRFLOW__SEGMENT_EXPORT__RATE_BUDGET_CONN_ID", "redis_budget")
    assert shared.configured_conn_id(Conn({})) == "redis_budget"
    assert shared.configured_conn_id(Conn({"rate_budget_conn_id": ""})) == "redis_budget"  # a blank form field
    assert shared.configured_conn_id(Conn({"rate_budget_conn_id": "other_redis"})) == "other_redis"


def test_a_missing_redis_connection_fails_naming_it(sandbox, monkeypatch):
    from segment_export.destinations.klaviyo.hook import KlaviyoHook
    from segment_export.hooks.base import DestinationError

    monkeypatch.setenv("AIRFLOW__SEGMENT_EXPORT__RATE_BUDGET_CONN_ID", "no_such_redis")
    with pytest.raises(DestinationError, match="rate budget's Redis connection 'no_such_redis' is not defined"):
        KlaviyoHook().get_list(KLAVIYO_LIST_ID)


def test_the_triggerers_async_hooks_draw_from_the_same_budget(sandbox, budget_conn, client, prefix):
    """A deferred export's polling (the async hooks, on the triggerer) takes the same tokens and slots."""
    import asyncio

    from segment_export.destinations.klaviyo.hook import KlaviyoAsyncHook
    from segment_export.destinations.mailchimp.hook import MailchimpAsyncHook

    async def poll() -> None:
        klaviyo, mailchimp = KlaviyoAsyncHook(), MailchimpAsyncHook()
        async with await klaviyo.client() as http:
            await klaviyo.request_json(http, "GET", f"/api/lists/{KLAVIYO_LIST_ID}", "lists")
        async with await mailchimp.client() as http:
            await mailchimp.request_json(http, "GET", "/ping")
        assert klaviyo.budget is not None and mailchimp.budget is not None
        assert mailchimp.budget.slots_in_use() == 0  # taken for the request, given back

    asyncio.run(poll())
    keys = {k.decode() for k in client.scan_iter(match=f"{prefix}:*")}
    assert any(k.startswith(f"{prefix}:klaviyo:") and k.endswith(":rate:lists") for k in keys)
    (account,) = [v for k, v in sandbox.state()["requests"]["by_account"].items() if k.startswith("mailchimp ")]
    assert account["admitted"]["GET /3.0/ping"]["count"] == 1


def test_a_connection_may_use_a_share_of_the_documented_limits(sandbox, airflow_conn, budget_conn):
    """``rate_limit_share`` leaves the rest of the key's limits to other apps, in the budget and per process."""
    from segment_export.destinations.klaviyo.hook import KlaviyoHook
    from segment_export.destinations.mailchimp.hook import MailchimpHook
    from segment_export.hooks.base import DestinationError

    airflow_conn("k_share", conn_type="klaviyo", host=sandbox.klaviyo_host, password=KLAVIYO_API_KEY,
                 extra=json.dumps({"rate_limit_share": 0.4}))
    hook = KlaviyoHook("k_share")
    hook.session
    assert hook.limits()["bulk-import"] == (4, 60) and hook.limits()["profiles"] == (30, 300)
    assert hook.budget.buckets["profiles"] == Bucket.for_limits(30, 300)
    assert hook._limiters["accounts"].burst == 1  # never below one a window
    airflow_conn("m_share", conn_type="mailchimp", host=sandbox.mailchimp_host, password=MAILCHIMP_API_KEY,
                 extra=json.dumps({"rate_limit_share": 0.5}))
    mailchimp = MailchimpHook("m_share")
    mailchimp.session
    assert mailchimp.budget.connections == 5
    airflow_conn("k_bad", conn_type="klaviyo", host=sandbox.klaviyo_host, password=KLAVIYO_API_KEY,
                 extra=json.dumps({"rate_limit_share": 2}))
    with pytest.raises(DestinationError, match="Klaviyo connection 'k_bad': extra rate_limit_share must be"):
        KlaviyoHook("k_bad").session
