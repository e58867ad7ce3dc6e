"""train.main under torchrun, reporting per rank whether the process group outlived it
(for tests/test_distributed.py; not a test file itself).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_exit.py TRAIN_ARGS...
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402

if __name__ == "__main__":
    code = train.main(sys.argv[1:])
    print(f"rank {os.environ['RANK']} exit {code} group_left_open "
          f"{torch.distributed.is_initialized()}", flush=True)
    sys.exit(code)
