"""What a batch shows in the Prefect UI, from its report."""

from flows.artifacts import TABLE_ROWS, table_rows


def test_the_table_is_capped_with_failures_and_reviews_first():
    rows = [{"entry_id": f"ok-{i}", "status": "finished_before", "verdict": "selected"} for i in range(3 * TABLE_ROWS)]
    rows.insert(700, {"entry_id": "review", "status": "succeeded", "verdict": "needs_review"})
    rows.insert(900, {"entry_id": "broken", "status": "failed"})
    shown = table_rows({"entries": rows})
    assert len(shown) == TABLE_ROWS and [r["entry_id"] for r in shown[:2]] == ["broken", "review"]
    assert table_rows({"entries": rows[:3]}) == rows[:3]


def test_a_run_that_left_entries_to_a_live_run_is_not_a_success():
    from flows.artifacts import final_state

    counts = {"total": 4, "succeeded": 3, "failed": 0, "skipped": 0, "changed": 0, "in_progress": 1}
    state = final_state({"counts": counts})
    assert state.is_failed() and "1 entries are held by a live run" in state.message
    assert final_state({"counts": {**counts, "in_progress": 0}}).is_completed()
