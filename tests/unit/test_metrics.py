"""metrics.jsonl: a torn last line (a write cut by a kill) is dropped on resume, the rest kept."""

from __future__ import annotations

import json

import pytest

from engram.train.metrics import MetricsLogger

RECORDS = [{"kind": "train", "step": s, "loss": 5.0 - s / 10} for s in range(1, 7)]


def _write(path, text):
    (path / "metrics.jsonl").write_text(text)


def test_resume_drops_a_torn_last_line_and_keeps_the_rest(tmp_path):
    whole = "".join(json.dumps(r) + "\n" for r in RECORDS)
    torn = json.dumps({"kind": "train", "step": 7, "loss": 4.2})[:17]  # cut mid-write, no newline
    _write(tmp_path, whole + torn)
    with pytest.warns(UserWarning, match="torn last line"):
        logger = MetricsLogger(tmp_path, resume_step=4)
    assert logger.read() == RECORDS[:4]  # cut back to the checkpoint's step, the torn line gone
    logger.log({"kind": "train", "step": 5, "loss": 1.0})  # appends cleanly after the repair
    assert logger.read() == RECORDS[:4] + [{"kind": "train", "step": 5, "loss": 1.0}]
    logger.close()


def test_resume_past_every_record_keeps_all_but_the_torn_line(tmp_path):
    whole = "".join(json.dumps(r) + "\n" for r in RECORDS)
    _write(tmp_path, whole + '{"kind": "ev')
    with pytest.warns(UserWarning, match="torn"):
        logger = MetricsLogger(tmp_path, resume_step=100)
    assert logger.read() == RECORDS
    assert (tmp_path / "metrics.jsonl").read_text() == whole
    logger.close()


def test_a_bad_line_before_the_last_is_corruption_not_a_torn_write(tmp_path):
    lines = [json.dumps(r) for r in RECORDS]
    lines[2] = lines[2][:10]
    _write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 3 is not JSON"):
        MetricsLogger(tmp_path, resume_step=4)
