import sys

from vmvault.cli import main

sys.exit(main())
