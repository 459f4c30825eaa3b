import logging
import os
import sys

from lamelm_fast.train.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # Under torchrun, leave without interpreter shutdown once main() has returned (run files closed, checkpoints
    # written, process group destroyed): a gloo worker thread may still be releasing the last collective, which holds
    # the tensors of earlier all-gathers, and its Python decref aborts the process (std::terminate, exit code -6)
    # if the interpreter is finalizing by then: seen about once in 30 two-process runs.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
