#!/usr/bin/env python3
"""A SQLite application that writes while its shard moves (Ferry's tests).

It keeps one long-lived connection to DB (Python's sqlite3 module, with a
busy timeout, as applications do) and inserts one row per write at RATE per
second, each in its own transaction. After each commit it logs the row's
sequence number to ACKS: an acknowledged write. During a live move's fence
its writes wait on SQLite's own locks, which Ferry holds; when the old
replica is retired its connection fails ("file is not a database"), and it
goes on with a new connection to THEN, the new owner.

Prints a JSON summary when STOP appears (or after --duration seconds).
"""

import argparse
import json
import os
import sqlite3
import sys
import time


def connect(path, timeout):
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    conn.execute("CREATE TABLE IF NOT EXISTS acks(seq INTEGER PRIMARY KEY, v BLOB NOT NULL)")
    return conn


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--then", help="the new owner's database, after the old one is retired")
    p.add_argument("--rate", type=float, default=100)
    p.add_argument("--size", type=int, default=200, help="bytes per row")
    p.add_argument("--acks", required=True)
    p.add_argument("--stop", required=True)
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--busy-timeout", type=float, default=30)
    args = p.parse_args()

    conn = connect(args.db, args.busy_timeout)
    acks = open(args.acks, "a", buffering=1)
    seq = conn.execute("SELECT coalesce(max(seq), 0) FROM acks").fetchone()[0]
    summary = {"acked": 0, "errors": [], "switched": False, "longest_gap_ms": 0}
    interval = 1.0 / args.rate
    started = last_ack = time.monotonic()
    next_at = started
    while not os.path.exists(args.stop) and time.monotonic() - started < args.duration:
        now = time.monotonic()
        if now < next_at:
            time.sleep(next_at - now)
        next_at += interval
        try:
            conn.execute("INSERT INTO acks(seq, v) VALUES (?, randomblob(?))", (seq + 1, args.size))
        except sqlite3.Error as e:
            summary["errors"].append(f"{type(e).__name__}: {e}")
            if summary["switched"] or not args.then or len(summary["errors"]) > 100:
                print(json.dumps(summary))
                sys.exit(f"sqlite_writer: {e}")
            # The old replica is gone: the new owner took over.
            conn.close()
            conn = connect(args.then, args.busy_timeout)
            summary["switched"] = True
            continue
        seq += 1
        acks.write(f"{seq}\n")
        summary["acked"] += 1
        gap = time.monotonic() - last_ack
        last_ack += gap
        summary["longest_gap_ms"] = max(summary["longest_gap_ms"], int(gap * 1000))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
