import sys

from pricefeed_client.cli import main

sys.exit(main())
