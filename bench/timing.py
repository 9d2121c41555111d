"""Timing set-up shared by the benchmarks: the same flags, clock and statistic everywhere."""
from __future__ import annotations

import os
import statistics
import time

import torch

STATS = {"min": min, "median": statistics.median}


def add_timing_args(ap, device_default: str = "cpu") -> None:
    ap.add_argument("--device", default=device_default)
    ap.add_argument("--stat", default="min", choices=["min", "median"],
                    help="per-variant statistic over rounds; min: on a shared machine contention only "
                         "adds time, so the fastest interleaved round estimates the uncontended cost")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0 = torch's default). 1 by default: on a shared 2-core machine "
                         "two OpenMP threads stall on each other's descheduling (steps varied 2x)")
    ap.add_argument("--clock", default="auto", choices=["auto", "cpu", "wall"],
                    help="auto: process CPU time on CPU with 1 thread (time the machine's other load "
                         "cannot inflate; measured spread ~1-2%% vs ~50%% wall), wall clock otherwise")


def setup_timing(args):
    """Apply --threads, resolve --clock ('auto' -> 'cpu' or 'wall' in args.clock); return the clock."""
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "auto":
        args.clock = "cpu" if args.device == "cpu" and torch.get_num_threads() == 1 else "wall"
    return time.process_time if args.clock == "cpu" else time.perf_counter


def device_name(device: str) -> str:
    return (f"CPU ({os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s)"
            if device == "cpu" else torch.cuda.get_device_name())
