"""train.main under torchrun, reporting per rank whether the process group outlived it, in a file
output_dir/exit-rank<N> (for tests/test_distributed.py; not a test file itself). A file per rank,
not stdout: two ranks' lines on one shared pipe are not guaranteed to both arrive intact.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_exit.py TRAIN_ARGS...
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distributed  # noqa: E402
import train  # noqa: E402

# This check is about every rank's own exit code and its process group, not about which rank
# prints the error line: no grace delay, so torchrun does not stop rank 1 while it waits.
distributed.PEER_EXIT_DELAY_S = 0

if __name__ == "__main__":
    code = train.main(sys.argv[1:])
    out = sys.argv[sys.argv.index("--output_dir") + 1]
    with open(os.path.join(out, f"exit-rank{os.environ['RANK']}"), "w") as f:
        f.write(f"{code} {torch.distributed.is_initialized()}\n")
    sys.exit(code)
