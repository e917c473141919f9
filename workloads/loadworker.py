"""Entry point of a load-generator process: ``python -m workloads.loadworker FD`` (FD: its socket to the parent)."""

import multiprocessing.connection
import sys

from workloads.client import worker_main

if __name__ == "__main__":
    worker_main(multiprocessing.connection.Connection(int(sys.argv[1])))
