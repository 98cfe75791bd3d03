"""The real embedder worker (all-MiniLM-L6-v2, BERT in numpy): a paraphrase ranks far above
unrelated sentences, embeddings are unit vectors that do not depend on the batch (padding
masked), a restored clone answers like the original, and a missing or corrupt model file is
one line naming it at cold start."""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest

from cxlfork_util import cxlfork, new_store, readline, restore_popen, rmtree
from test_workers_llm import Worker


def _model_ready() -> str | None:
    try:
        from cxlfork.workers.models import minilm_files
        import tokenizers  # noqa: F401
        minilm_files()
    except Exception as e:                 # noqa: BLE001 - the reason is the skip message
        return f"{type(e).__name__}: {e} (run `make .stamps/porter-workers`)"
    return None


pytestmark = pytest.mark.skipif(_model_ready() is not None, reason=str(_model_ready()))

QUERY = "How do I bake bread at home?"
TEXTS = [QUERY,
         "What is the way to make a loaf of bread in my own kitchen?",     # the paraphrase
         "The stock market fell sharply on Tuesday.",
         "Jupiter is the largest planet in the solar system.",
         "She plays the violin in an orchestra."]


def test_paraphrase_ranks_far_above_unrelated_and_batching_does_not_matter():
    w = Worker("embed", {})
    try:
        assert w.ready == {"ready": True}
        e = np.array(w.ask({"texts": TEXTS})["embeddings"])
        assert e.shape == (5, 384)
        assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
        sims = e[1:] @ e[0]
        assert int(np.argmax(sims)) == 0, sims                   # the paraphrase first
        assert sims[0] > 0.6 and sims[0] - sims[1:].max() > 0.4, sims
        # alone (no padding) the same vector as inside the padded batch
        alone = np.array(w.ask({"texts": [TEXTS[2]]})["embeddings"][0])
        assert np.abs(alone - e[2]).max() < 1e-5
        bad = w._send({"id": 50, "input": {"texts": []}})
        assert "at least one text" in bad["error"]
    finally:
        w.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cxlfork ptrace)")
def test_restored_embedder_clone_answers_like_the_original():
    import json
    d = tempfile.mkdtemp(prefix="workers-embed-")
    store = new_store()
    w = Worker("embed", {})
    try:
        ref = w.ask({"texts": TEXTS[:2]})["embeddings"]
        img = os.path.join(d, "embed.img")
        cxlfork("checkpoint", w.p.pid, "-o", img, "--store", store)
        c = restore_popen(img, "--policy", "mow")
        try:
            c.stdin.write(json.dumps({"id": 3, "input": {"texts": TEXTS[:2]}}).encode() + b"\n")
            c.stdin.flush()
            ans = json.loads(readline(c.stdout, 60))
            assert ans["output"]["embeddings"] == ref
            c.stdin.close()
            assert c.wait(timeout=60) == 0
        finally:
            if c.poll() is None:
                c.kill()
                c.wait()
    finally:
        w.close()
        cxlfork("rm", os.path.join(d, "embed.img"), check=False)
        rmtree(d)
        shutil.rmtree(store, ignore_errors=True)


def test_missing_and_corrupt_model_files_are_one_line_naming_them(tmp_path):
    from cxlfork.workers.models import minilm_files
    good = minilm_files()
    empty = tmp_path / "empty"
    empty.mkdir()
    w = Worker("embed", {"model_dir": str(empty)})
    try:
        err = w.ready["error"]
        assert str(empty / "model.safetensors") in err and "missing" in err, err
        assert "\n" not in err and w.p.wait(timeout=30) == 1
    finally:
        w.close()
    # each file in turn truncated, the others intact
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        for n, src in good.items():
            if n == name:
                with open(src, "rb") as f:
                    (d / n).write_bytes(f.read(4096)[:300])
            else:
                os.symlink(src, d / n)
        w = Worker("embed", {"model_dir": str(d)})
        try:
            err = w.ready["error"]
            assert str(d / name) in err and "corrupt" in err and "\n" not in err, (name, err)
            assert w.p.wait(timeout=30) == 1
        finally:
            w.close()
