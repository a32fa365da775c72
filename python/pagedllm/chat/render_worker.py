"""A chat-template render worker: a separate process (started by render_pool.py as `python render_worker.py
MEMORY_BYTES`) that renders templates one at a time, so a runaway template can be killed without harming the
process that asked.

It caps its own address space (RLIMIT_AS) before reading any job, and arms a SIGALRM (default action: terminate)
for every job, so it dies on its own even if its parent is gone. It imports sandbox.py by file location, never the
pagedllm package (no torch here).

Protocol on stdin/stdout, each message an 8-byte little-endian length then the payload:
- worker -> parent once at start: b"ready";
- parent -> worker: pickle of {"template", "variables", "max_output_chars", "timeout_s"} (plain data only);
- worker -> parent: JSON {"text": ...} or {"kind": ..., "message": ...}. JSON, not pickle, on the way back: the
  parent never unpickles what a template could influence.
"""
import importlib.util
import json
import os
import pickle
import resource
import signal
import struct
import sys

_HEADER = struct.Struct("<Q")


def _load_sandbox():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox.py")
    spec = importlib.util.spec_from_file_location("pagedllm_chat_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_exact(stream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


def _send(stream, payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def main() -> int:
    memory = int(sys.argv[1])
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr   # nothing but replies goes to the reply pipe
    sandbox = _load_sandbox()
    cache = sandbox.TemplateCache(sandbox.make_environment())
    if memory > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    _send(replies, b"ready")
    while True:
        try:
            (size,) = _HEADER.unpack(_read_exact(requests, _HEADER.size))
            job = pickle.loads(_read_exact(requests, size))
        except EOFError:
            return 0   # the parent closed the pipe (or died)
        # Backstop only: the parent kills this process at timeout_s already.
        signal.setitimer(signal.ITIMER_REAL, float(job["timeout_s"]) + 2.0)
        try:
            reply = {"text": sandbox.render_template(cache, job["template"], job["variables"],
                                                     int(job["max_output_chars"]))}
        except sandbox.TemplateFailure as e:
            reply = {"kind": e.kind, "message": e.message}
        except MemoryError:
            reply = {"kind": "memory", "message": ""}
        signal.setitimer(signal.ITIMER_REAL, 0)
        del job
        try:
            payload = json.dumps(reply, ensure_ascii=False).encode("utf-8", "surrogatepass")
        except MemoryError:
            payload = json.dumps({"kind": "memory", "message": ""}).encode()
        del reply
        _send(replies, payload)


if __name__ == "__main__":
    sys.exit(main())
