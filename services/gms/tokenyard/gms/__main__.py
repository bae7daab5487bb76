import sys

from tokenyard.gms.main import main

sys.exit(main())
