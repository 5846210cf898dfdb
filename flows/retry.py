"""Every retry policy of the flows, declared once. Only I/O retries: a transient storage error, a model
sync, a call to the Prefect API — never a missing file, a bad URI or an edit that failed."""

from __future__ import annotations

from imagic.io.storage import is_transient


def transient_only(task, task_run, state) -> bool:
    """A Prefect `retry_condition_fn`."""
    return is_transient(state.result(raise_on_failure=False))


# Every task that reads or writes the store.
STORAGE_RETRIES = dict(retries=3, retry_delay_seconds=[2, 5, 15], retry_condition_fn=transient_only)
# Loading a model: syncing an s3:// model may hit a transient fault; a missing or incomplete model is final.
MODEL_LOAD_RETRIES = dict(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=transient_only)
# Submitting a chunk run and waiting for it: the Prefect API may drop a call (the idempotency key makes a
# retry return the run it already created).
DISPATCH_RETRIES = dict(retries=3, retry_delay_seconds=[5, 15, 60])
