"""Thumbnail worker (Python + numpy): bilinear resize of a raw RGB8 image.

input:  {"width": W, "height": H, "data": base64 of W*H*3 bytes, "size": [w, h]}
        or {"width": W, "height": H, "seed": S, "size": [w, h]} for a generated test image
output: {"width": w, "height": h, "data": base64 of w*h*3 bytes, "mean": [r, g, b]}
init:   {"max_pixels": N} (default 4 Mpixel)
"""
import base64

import numpy as np

from cxlfork.workers.protocol import serve


def init(cfg):
    state = {"max_pixels": int(cfg.get("max_pixels", 4 << 20))}
    resize(np.zeros((8, 8, 3), np.uint8), 4, 4)          # warm numpy's code paths
    return state


def resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    H, W = img.shape[:2]
    ys = (np.arange(h) + 0.5) * H / h - 0.5
    xs = (np.arange(w) + 0.5) * W / w - 0.5
    y0 = np.clip(np.floor(ys).astype(int), 0, H - 1)
    x0 = np.clip(np.floor(xs).astype(int), 0, W - 1)
    y1, x1 = np.minimum(y0 + 1, H - 1), np.minimum(x0 + 1, W - 1)
    wy = np.clip(ys - y0, 0, 1)[:, None, None]
    wx = np.clip(xs - x0, 0, 1)[None, :, None]
    f = img.astype(np.float32)
    top = f[y0][:, x0] * (1 - wx) + f[y0][:, x1] * wx
    bot = f[y1][:, x0] * (1 - wx) + f[y1][:, x1] * wx
    return np.clip(top * (1 - wy) + bot * wy + 0.5, 0, 255).astype(np.uint8)


def handle(state, inp):
    if not isinstance(inp, dict):
        raise ValueError("input must be an object with width, height, data or seed, size")
    W, H = int(inp["width"]), int(inp["height"])
    w, h = (int(x) for x in inp["size"])
    if not (0 < W * H <= state["max_pixels"] and 0 < w * h <= state["max_pixels"]):
        raise ValueError(f"image sizes must be 1..{state['max_pixels']} pixels")
    if "data" in inp:
        raw = base64.b64decode(inp["data"])
        if len(raw) != W * H * 3:
            raise ValueError(f"data has {len(raw)} bytes, expected {W * H * 3}")
        img = np.frombuffer(raw, np.uint8).reshape(H, W, 3)
    else:
        img = np.random.default_rng(int(inp.get("seed", 0))).integers(0, 256, (H, W, 3),
                                                                       dtype=np.uint8)
    out = resize(img, w, h)
    return {"width": w, "height": h, "data": base64.b64encode(out.tobytes()).decode(),
            "mean": [round(float(x), 3) for x in out.reshape(-1, 3).mean(axis=0)]}


if __name__ == "__main__":
    serve(init, handle)
