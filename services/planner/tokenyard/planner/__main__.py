import sys

from tokenyard.planner.main import main

sys.exit(main())
