"""Worker programs for the cxlfork porter: each speaks the porter's worker protocol
(newline-delimited JSON on stdin/stdout, see docs/porter.md and `protocol`).

    llm        a small decoder-only transformer in numpy (weights from `llm_weights`)
    thumbnail  image resize in numpy (bilinear), raw RGB8 in and out as base64
    echo       answers with its input; can crash or hang on request (for tests)
    wordcount  a C program (wordcount.c, built by `build_c`)
"""
