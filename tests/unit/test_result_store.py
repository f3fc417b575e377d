"""The result store refuses names that are not job ids (no Redis)."""

from __future__ import annotations

from services.common.result_store import ResultStore

CLEAN = "The Eiffel Tower is in the city of"


def test_the_result_store_refuses_names_that_are_not_job_ids(tmp_path):
    results = ResultStore(tmp_path)
    name = results.write("0" * 32, b"data")
    assert results.path(name) is not None
    for bad in ["../etc/passwd", "0" * 32, f"{'0' * 31}g.nnfr", f"../{name}", "/" + name]:
        assert results.path(bad) is None
    try:
        results.write("../../x", b"")
    except ValueError:
        pass
    else:
        raise AssertionError("a path was accepted as a job id")
