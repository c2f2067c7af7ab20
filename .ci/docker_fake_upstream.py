"""
A tiny fake OpenAI upstream for .ci/docker-test (standard library only).

Listens on 127.0.0.1, port chosen by the system, and writes that port to the
file named by argv[1]. POST /v1/chat/completions with "stream": true answers
SSE: the first chunk at once, then it holds until GET /release arrives, then
the rest and [DONE] — so the test can stop the container while a stream is
provably open. Anything else gets a small JSON chat answer.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RELEASE = threading.Event()
WORDS = ["Hello", " from", " the", " fake", " upstream", "."]


def chunk(content: str, finish=None) -> bytes:
    obj = {"id": "chatcmpl-docker", "object": "chat.completion.chunk", "created": 0,
           "model": "gpt-4o-mini",
           "choices": [{"index": 0, "delta": {"content": content} if content else {},
                        "finish_reason": finish}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def do_GET(self):
        if self.path == "/release":
            RELEASE.set()
        self.send_json({"ok": True})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if not body.get("stream"):
            self.send_json({"id": "chatcmpl-docker", "object": "chat.completion",
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant",
                                                     "content": "".join(WORDS)}}]})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.send_chunk(chunk(WORDS[0]))
        RELEASE.wait(120)
        for word in WORDS[1:]:
            self.send_chunk(chunk(word))
        self.send_chunk(chunk("", "stop") + b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def send_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def send_json(self, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    import os
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    server.serve_forever()
