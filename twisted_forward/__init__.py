"""twisted-forward: a streaming OpenAI API forwarding proxy built on Twisted."""

__version__ = "0.1.0"
