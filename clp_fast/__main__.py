import sys

from clp_fast.cli import main

sys.exit(main())
