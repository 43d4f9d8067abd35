"""Command-line flags the dense trainers (`transnext seg train`, `transnext det train`) share."""
from __future__ import annotations

import argparse

from ...cli_checks import non_negative_int, output_file, positive_int, threads_value


def add_run_flags(a) -> None:
    """Logging, loader, threads, seed, checks and outputs (``a``: a parser's add_argument)."""
    a("--log-interval", type=positive_int, default=None)
    a("--eval-batch-size", type=positive_int, default=None)
    a("--workers", type=non_negative_int, default=None)
    a("--threads", type=threads_value, default=None,
      help="CPU intra-op threads: N, or 'auto' (time N vs 1 early on, keep the faster)")
    a("--seed", type=non_negative_int, default=None)
    a("--deterministic", action="store_true")
    a("--no-verify", action="store_true", help="skip the up-front check of every data file")
    a("--no-tensorboard", action="store_true")
    a("--no-progress", dest="progress", action="store_false")
    a("--json", default=None, type=output_file, metavar="PATH", help="write the run summary here")
    a("--stop-after-iters", type=positive_int, default=None, help=argparse.SUPPRESS)
