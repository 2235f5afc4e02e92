import sys

from mhpc.cli import main

sys.exit(main())
