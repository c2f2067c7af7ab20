"""twistd plugin: ``twistd -n openai-forward --port 9999``."""

from twisted.application.service import ServiceMaker

openai_forward = ServiceMaker(
    "OpenAI Forward",
    "twisted_forward.tap",
    "A streaming OpenAI API forwarding proxy.",
    "openai-forward",
)
