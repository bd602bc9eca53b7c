import sys

from projectord.cli import main

sys.exit(main())
