import sys

from projectord.cli.main import main

sys.exit(main())
