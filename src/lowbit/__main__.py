"""`python -m lowbit ...` (and `torchrun --nproc-per-node N -m lowbit generate --tp N ...`)."""

import sys

from lowbit.cli import main

sys.exit(main())
