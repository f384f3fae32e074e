import sys

from sdpo.train.cli import main

sys.exit(main())
