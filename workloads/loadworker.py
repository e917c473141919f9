"""Entry point of a load-generator process: ``python -m workloads.loadworker FD PARENT_PID`` (FD: its socket to the
parent, which it does not outlive)."""

import multiprocessing.connection
import sys

from workloads.client import die_with_parent, worker_main

if __name__ == "__main__":
    die_with_parent(int(sys.argv[2]))
    worker_main(multiprocessing.connection.Connection(int(sys.argv[1])))
