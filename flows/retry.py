"""Retry only what trying again can fix: a transient storage error, not a missing file or a bad URI."""

from __future__ import annotations

from imagic.storage import is_transient


def transient_only(task, task_run, state) -> bool:
    """A Prefect `retry_condition_fn`."""
    return is_transient(state.result(raise_on_failure=False))


# The retry policy of every task that reads or writes the store.
STORAGE_RETRIES = dict(retries=3, retry_delay_seconds=[2, 5, 15], retry_condition_fn=transient_only)
