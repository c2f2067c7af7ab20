"""``python -m twisted_forward.chat``: the chat-record command line."""

import sys

from .export import main

sys.exit(main())
