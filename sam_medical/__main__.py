import sys

from sam_medical.cli.main import main

sys.exit(main())
