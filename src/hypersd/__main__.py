import sys

from hypersd.cli import main

sys.exit(main())
