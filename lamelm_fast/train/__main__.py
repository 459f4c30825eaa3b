import sys

from lamelm_fast.train.cli import main

sys.exit(main())
