import sys

from tokenyard.router.main import main

sys.exit(main())
