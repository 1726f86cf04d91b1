import re
from types import SimpleNamespace

import numpy as np
import pytest

from data_curation import hkmeans, knn
from data_curation import progress as progress_module
from data_curation.dedup import deduplicate
from data_curation.hkmeans import KMeansParams, LevelSpec, fit_hierarchy
from data_curation.progress import Progress
from data_curation.retrieval import retrieval_picks
from pipeline.stages.curate import _embedding_progress


def test_a_line_at_most_every_interval_and_none_once_done():
    lines: list[str] = []
    every_call = Progress(lines.append, "near dedup", 4, "images searched", every_s=0.0)
    for done in (1, 3, 4):
        every_call(done)
    assert len(lines) == 2 and re.fullmatch(r"near dedup: 1/4 images searched in \d+ s, about \d+ s left", lines[0])
    assert lines[1].startswith("near dedup: 3/4 images searched in ")
    quiet = Progress(lines.append, "near dedup", 4, "images searched", every_s=3600.0)
    quiet(1)
    Progress(None, "near dedup", 4, "images searched", every_s=0.0)(1)
    assert len(lines) == 2


def test_the_long_steps_log_progress(monkeypatch):
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY_S", 0.0)  # every piece of work is "long"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    lines: list[str] = []
    params = KMeansParams(levels=(LevelSpec(40, 2), LevelSpec(4, 1)), iterations=3, seed=0)
    logged = fit_hierarchy(x, params, log=lines.append)
    seeding = [line.split(" in ")[0] for line in lines if "k-means++ seeding" in line]  # a line a round
    for level, k in ((1, 40), (2, 4)):
        drawn = [int(line.split(": ")[-1].split("/")[0]) for line in seeding if line.startswith(f"k-means level {level}/2")]
        assert drawn[0] == 1 and drawn == sorted(set(drawn)) and drawn[-1] < k
    assert seeding[0] == "k-means level 1/2 (k = 40, 4,000 points): k-means++ seeding: 1/40 centres"
    lines = [line for line in lines if "k-means++ seeding" not in line]
    assert [line.split(" in ")[0] for line in lines] == [
        "k-means level 1/2 (k = 40, 4,000 points): first k-means: 1/3 Lloyd iterations",  # none at 3/3: done
        "k-means level 1/2 (k = 40, 4,000 points): first k-means: 2/3 Lloyd iterations",
        "k-means level 1/2 (k = 40, 4,000 points): first k-means done",
        "k-means level 1/2 (k = 40, 4,000 points): 1/2 resampling steps",
        "k-means level 1/2 (k = 40, 4,000 points): done",
        "k-means level 2/2 (k = 4, 40 points): first k-means: 1/3 Lloyd iterations",
        "k-means level 2/2 (k = 4, 40 points): first k-means: 2/3 Lloyd iterations",
        "k-means level 2/2 (k = 4, 40 points): first k-means done",
        "k-means level 2/2 (k = 4, 40 points): done"]
    assert lines[2].endswith(", 2 resampling steps to go") and lines[7].endswith(", 1 resampling step to go")
    # Lloyd passes one at a time (a long first k-means) give the centroids of one faiss call, also
    # where faiss splits empty clusters (many repeated points, and centroids far from them all).
    quiet = fit_hierarchy(x, params)
    for one_at_a_time, at_once in zip(logged.centroids, quiet.centroids, strict=True):
        np.testing.assert_array_equal(one_at_a_time, at_once)
    repeated = np.repeat(x[:30], 20, axis=0)
    far = np.concatenate([repeated[:20], 5.0 + rng.normal(size=(20, 8)).astype(np.float32)])
    np.testing.assert_array_equal(hkmeans._first_kmeans(repeated, far, 6, 7, lines.append, "split"),
                                  hkmeans._lloyd(repeated, far, 6, 7))
    lines.clear()  # a level too narrow to resample does not count steps it skips
    fit_hierarchy(x[:60], KMeansParams(levels=(LevelSpec(40, 3),), iterations=1, seed=0), log=lines.append)
    lines = [line for line in lines if "k-means++ seeding" not in line]
    assert [line.split(" in ")[0] for line in lines] == ["k-means level 1/1 (k = 40, 60 points): first k-means done",
                                                         "k-means level 1/1 (k = 40, 60 points): done"]
    assert lines[0].endswith(", 0 resampling steps to go")
    lines.clear()
    monkeypatch.setattr(knn, "BLOCK_ROWS", 1000)  # 4,000 rows: four blocks of queries
    deduplicate(np.arange(len(x)).astype(str), x, log=lines.append)
    assert [line.split(" in ")[0] for line in lines] == [f"near dedup: {n:,}/4,000 distinct images searched"
                                                         for n in (1000, 2000, 3000)]
    lines.clear()
    retrieval_picks(x, x, 2, log=lines.append)
    assert [line.split(" in ")[0] for line in lines] == [f"retrieval: {n:,}/4,000 queries searched"
                                                         for n in (1000, 2000, 3000)]


@pytest.mark.parametrize("every_s, shown", [(3600.0, [0, 3]), (0.0, [0, 1, 2, 3])])
def test_embedding_logs_its_first_and_last_chunk_and_at_most_a_line_an_interval_between(monkeypatch, every_s, shown):
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY_S", every_s)
    lines: list[str] = []
    on_chunk = _embedding_progress(SimpleNamespace(log=lines.append), {7: 16, 8: 16, 9: 16, 10: 4}, "seeds: ")
    for index in (7, 8, 9, 10):
        on_chunk(index)
    assert [int(re.search(r"(\d+)/4 chunks", line)[1]) - 1 for line in lines] == shown
    assert re.fullmatch(r"seeds: embedded chunk 7: 1/4 chunks, 16/52 images, \d+ images/s, about [\d,]+ s left", lines[0])
    assert lines[-1].startswith("seeds: embedded chunk 10: 4/4 chunks, 52/52 images, ")
