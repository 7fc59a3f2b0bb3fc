import sys

from lmconform.cli import main

sys.exit(main())
