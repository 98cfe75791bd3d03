"""A WSGI app for the gunicorn tree test: answers "getpid getppid hits" (hits: requests this
worker answered, in its memory)."""
import os

hits = 0


def app(environ, start_response):
    global hits
    hits += 1
    body = f"{os.getpid()} {os.getppid()} {hits}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
