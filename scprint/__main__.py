import sys

from scprint.cli import main

sys.exit(main())
