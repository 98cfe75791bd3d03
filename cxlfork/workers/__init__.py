"""Worker programs for the cxlfork porter: each speaks the porter's worker protocol
(newline-delimited JSON on stdin/stdout, see docs/porter.md and `protocol`).

    llm        SmolLM2-135M-Instruct (GGUF, Q4_1) on llama.cpp through llama-cpp-python
    embed      all-MiniLM-L6-v2 sentence embeddings, a BERT forward pass in numpy
    thumbnail  image resize in numpy (bilinear), raw RGB8 in and out as base64
    echo       answers with its input; can crash or hang on request (for tests)
    wordcount  a C program (wordcount.c, built by `build_c`)

`models` finds the model files the PyPI packages ship (and extracts the embedder's).
"""
