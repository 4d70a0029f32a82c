import sys

from relora.cli import main

sys.exit(main())
