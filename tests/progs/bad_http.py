"""HTTP servers that break the contract on purpose, for the porter's bad-input tests (stdlib).

    bad_http.py never-listen   sleeps, never listens
    bad_http.py garbage-run    a proper 200 to /init, then bytes that are not HTTP to /run
    bad_http.py hang-run       a proper 200 to /init, then half a status line to /run, and
                               hangs with the connection open
    bad_http.py die-run        a proper 200 to /init, exits with status 7 on /run
    bad_http.py echo           a Knative-style server on $PORT: answers 201 with the request
                               it got (method, path with query, headers, body, $PORT)
    bad_http.py echo-idle-close   the same, closing a kept-alive connection idle for 0.3 s
                               (as servers with a keep-alive timeout do)
"""
import json
import os
import socket
import sys
import time

mode = sys.argv[1]
if mode == "never-listen":
    time.sleep(3600)
    sys.exit(0)

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(os.environ.get("PORT", "8080"))))
srv.listen(8)


def read_request(conn, f):
    line = f.readline()
    if not line:
        return None
    method, path, _ = line.decode().split(" ", 2)
    headers = {}
    while True:
        h = f.readline().decode()
        if h in ("\r\n", "\n", ""):
            break
        k, v = h.split(":", 1)
        headers[k.strip()] = v.strip()
    body = f.read(int(headers.get("Content-Length", "0")))
    return method, path, headers, body


def reply(conn, status, body: bytes, extra=""):
    conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
                 f"Content-Type: application/json\r\n{extra}\r\n".encode() + body)


while True:
    conn, _ = srv.accept()
    if mode == "echo-idle-close":
        conn.settimeout(0.3)
    f = conn.makefile("rb")
    while True:
        try:
            req = read_request(conn, f)
        except (TimeoutError, OSError):
            req = None
        if req is None:
            break
        method, path, headers, body = req
        if mode.startswith("echo"):
            reply(conn, 201, json.dumps({"method": method, "path": path, "headers": headers,
                                         "body": body.decode("latin-1"),
                                         "port_env": os.environ.get("PORT")}).encode(),
                  "X-Echo-Server: bad_http\r\n")
            conn.settimeout(0.3 if mode == "echo-idle-close" else None)
        elif path == "/init":
            reply(conn, 200, b'{"ok": true}')
        elif mode == "garbage-run":
            conn.sendall(b"\x00\x01 this is not HTTP at all\r\n\r\n")
        elif mode == "hang-run":
            conn.sendall(b"HTTP/1.1 20")
            time.sleep(3600)
        elif mode == "die-run":
            os._exit(7)
    f.close()
    conn.close()
