import sys

from pmf.cli import main

sys.exit(main())
