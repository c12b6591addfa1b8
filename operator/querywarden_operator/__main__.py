"""``python -m querywarden_operator``: the operator, configured from the environment."""

import logging
import sys

from querywarden_operator.run import run_operator

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
sys.exit(run_operator())
