import sys

from laion_assets.cli import main

sys.exit(main())
