"""Pre-fork TCP servers for the process-tree tests (cxlfork checkpoint of a live tree).

prefork.py pool PORT|PATH N: the parent binds 127.0.0.1:PORT (or a unix socket at PATH) and
forks N workers that each call
accept() on the inherited listening socket (as gunicorn's sync workers do); a worker answers
"getpid getppid index count request total" (count: the requests it answered, in its own
memory; total: all workers' requests, in a MAP_SHARED|MAP_ANONYMOUS page the parent mapped
before forking them).
The parent prints "ready W1 W2 ..." and waits on stdin; on a line it SIGTERMs its workers by
their stored PIDs, reaps them with waitpid and prints "done ok" if each died of SIGTERM.

prefork.py forking PORT: socketserver.ForkingTCPServer (a child forked per connection); a
request "hold" keeps its child alive until the peer closes or resets the connection, any other
gets "getpid getppid count request" (count: connections the parent accepted, in its memory).
The parent prints "ready" and serves until a line arrives on stdin, then reaps its children
and prints "done ok"."""
import mmap
import os
import select
import signal
import socket
import socketserver
import struct
import sys


def pool(where: str, n: int) -> None:
    if where.startswith("/"):               # a unix socket bound to that path
        ls = socket.socket(socket.AF_UNIX)
        ls.bind(where)
    else:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", int(where)))
    ls.listen(16)
    board = mmap.mmap(-1, 4096)             # MAP_SHARED|MAP_ANONYMOUS: all workers' total
    workers = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            count = 0
            while True:
                c, _ = ls.accept()
                req = c.recv(100).decode().strip()
                count += 1
                total = struct.unpack_from("Q", board)[0] + 1
                struct.pack_into("Q", board, 0, total)
                c.sendall(f"{os.getpid()} {os.getppid()} {i} {count} {req} {total}\n".encode())
                c.close()
        workers.append(pid)
    print("ready", *workers, flush=True)
    sys.stdin.readline()
    for w in workers:
        os.kill(w, signal.SIGTERM)
    sts = [os.waitpid(w, 0)[1] for w in workers]
    ok = all(os.WIFSIGNALED(s) and os.WTERMSIG(s) == signal.SIGTERM for s in sts)
    print("done", "ok" if ok else f"statuses {sts}", flush=True)


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        req = self.request.recv(100).decode().strip()
        if req == "hold":
            self.request.sendall(b"holding\n")
            try:
                while self.request.recv(100):
                    pass
            except ConnectionResetError:
                os._exit(3)
            return
        self.request.sendall(f"{os.getpid()} {os.getppid()} {self.server.count} "
                             f"{req}\n".encode())


class Server(socketserver.ForkingTCPServer):
    allow_reuse_address = True
    count = 0

    def process_request(self, request, client_address):
        self.count += 1
        super().process_request(request, client_address)


def forking(port: int) -> None:
    srv = Server(("127.0.0.1", port), Handler)
    print("ready", flush=True)
    while True:
        r, _, _ = select.select([srv, sys.stdin], [], [], 0.2)
        if sys.stdin in r:
            break
        if srv in r:
            srv._handle_request_noblock()
        srv.service_actions()               # reaps finished children (waitpid of their PIDs)
    srv.server_close()                      # waits for the children left
    print("done", "ok" if not srv.active_children else f"left {srv.active_children}",
          flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "pool":
        pool(sys.argv[2], int(sys.argv[3]))
    else:
        forking(int(sys.argv[2]))
