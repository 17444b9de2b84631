"""The journal feed's delivery rate (entries/s) while SubmitBatch runs, in one run on one server
(issue 11's benchmark):

    .venv/bin/python bench/feed.py [--cards 20000] [--seconds 4] [--rounds 2]
                                   [--out bench/feed_results.json]

Each round, the order alternating between rounds: SubmitBatch of 1,000 purchases (4 callers,
e2e's runner) alone; the same with one WatchJournal stream reading the journal from seq 1 at
the same time (the seeding and the earlier rounds' purchases are its backlog, so it delivers as
fast as it can, not only as fast as entries are written); and the stream alone, no load. Rows:
``batch_alone`` and ``batch_watched`` (purchases/s: what a watcher costs the writer's
clients), ``feed_under_batch`` and ``feed_alone`` (entries delivered/s by the stream, parsed by
the client; ``caught_up`` says whether it reached the journal's end inside the window, when the
figure is bounded by the write rate instead). Server CPU per operation or entry beside each.
"""
from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import e2e  # noqa: E402  (the servers, seeding and batch runner of the end-to-end benchmark)

from cardcore.cards import random_number  # noqa: E402
from cardcore.v1 import admin_service_pb2 as apb  # noqa: E402

WATCH = "/cardcore.v1.AdminService/WatchJournal"


async def follow(target: str, seconds: float) -> dict:
    """One stream from seq 1 (a development server: no token) until it catches up or
    ``seconds`` pass: the entries it delivered, over how long, and whether it caught up (then
    the backlog is delivered and the rate from there on would be the write rate: not counted)."""
    counted = {"entries": 0, "caught_up": False}
    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.unary_stream(WATCH)(apb.WatchJournalRequest(from_seq=1).SerializeToString())
        t0 = time.perf_counter()
        timer = asyncio.get_running_loop().call_later(seconds, call.cancel)
        try:
            async for raw in call:
                answer = apb.WatchJournalResponse.FromString(raw)
                counted["entries"] += len(answer.entries)
                if answer.caught_up:
                    counted["caught_up"] = True
                    break
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass  # the window ended first
        finally:
            counted["seconds"] = time.perf_counter() - t0
            timer.cancel()
            call.cancel()
    return counted


def feed_row(counted: dict, cpu_s: float | None) -> dict:
    """The stream's row; the server's CPU per entry only when the stream ran alone."""
    return {"tx_per_s": round(counted["entries"] / counted["seconds"]),
            "entries": counted["entries"], "seconds": round(counted["seconds"], 2),
            "caught_up": counted["caught_up"],
            "server_cpu_us_per_op": "-" if cpu_s is None else
            round(cpu_s / max(counted["entries"], 1) * 1e6, 1)}


def watched(proc, payloads: list[bytes], seconds: float) -> tuple[dict, dict]:
    """The batches and a stream at once: (the batches' row, the stream's row)."""
    counted: dict = {}

    async def run():
        out, feed = await asyncio.gather(e2e.run_batches(proc.target, payloads, seconds),
                                         follow(proc.target, seconds))
        counted.update(feed)
        return out

    batch = e2e.measure(proc, run)
    return batch, feed_row(counted, None)


def alone(proc, seconds: float) -> dict:
    cpu0 = proc.cpu_s()
    counted = asyncio.run(follow(proc.target, seconds))
    return feed_row(counted, proc.cpu_s() - cpu0)


def main() -> None:
    args = e2e.rounds_args(__doc__, "feed_results.json")
    rng = random.Random(11)
    numbers = [random_number(rng) for _ in range(args.cards)]
    rows: dict[str, list] = {"batch_alone": [], "batch_watched": [], "feed_under_batch": [],
                             "feed_alone": []}
    with tempfile.TemporaryDirectory() as tmp:
        proc = e2e.start_cardcore(os.path.join(tmp, "data"), os.path.join(tmp, "server.log"))
        try:
            e2e.seed(proc.target, numbers)
            requests = e2e.Requests(numbers, "feed")
            n = int(args.seconds * 40)  # more batches than a run can send
            for k in range(args.rounds):
                steps = ["alone", "watched"][::1 if k % 2 == 0 else -1]
                for step in steps:
                    payloads = requests.batches(n)
                    if step == "alone":
                        rows["batch_alone"].append(e2e.measure(
                            proc, lambda p=payloads: e2e.run_batches(proc.target, p,
                                                                     args.seconds)))
                    else:
                        batch, feed = watched(proc, payloads, args.seconds)
                        rows["batch_watched"].append(batch)
                        rows["feed_under_batch"].append(feed)
                rows["feed_alone"].append(alone(proc, args.seconds))
        finally:
            log = proc.stop()
    ratios = {"batch_watched_vs_alone": e2e.median_ratio(rows, "batch_watched", "batch_alone")}
    e2e.report_rounds(args.out, rows, ratios, {"cards": args.cards, "seconds": args.seconds},
                      log)
    for name in ("feed_under_batch", "feed_alone"):
        print(f"{name}: caught up in the window: "
              + " / ".join("yes" if r["caught_up"] else "no" for r in rows[name]))


if __name__ == "__main__":
    main()
