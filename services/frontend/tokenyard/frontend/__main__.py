import sys

from tokenyard.frontend.main import main

sys.exit(main())
