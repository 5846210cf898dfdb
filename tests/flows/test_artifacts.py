"""What a batch shows in the Prefect UI, from its report."""

from flows.artifacts import TABLE_ROWS, table_rows


def test_the_table_is_capped_with_failures_and_reviews_first():
    rows = [{"entry_id": f"ok-{i}", "status": "finished_before", "verdict": "selected"} for i in range(3 * TABLE_ROWS)]
    rows.insert(700, {"entry_id": "review", "status": "succeeded", "verdict": "needs_review"})
    rows.insert(900, {"entry_id": "broken", "status": "failed"})
    shown = table_rows({"entries": rows})
    assert len(shown) == TABLE_ROWS and [r["entry_id"] for r in shown[:2]] == ["broken", "review"]
    assert table_rows({"entries": rows[:3]}) == rows[:3]
