import sys

from tokenyard.worker.main import main

sys.exit(main())
