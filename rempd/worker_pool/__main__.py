"""`python -m rempd.worker_pool ADDRESS`: a worker process, started by WorkerPool."""
import sys

from rempd.worker_pool.worker import worker_main

worker_main(sys.argv[1])
