"""`python -m loraserve.tools.perplexity`: see run.py."""

import sys

from loraserve.tools.perplexity.run import main

sys.exit(main())
