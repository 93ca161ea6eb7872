"""CLI progress bars: items reported by stage tasks advance their stage's bar."""
from flows import progress
from tasks import stage_task


def test_items_and_batch_summaries_advance_the_bars():
    with progress.show_progress(True):
        bars, ids, _ = progress._active
        progress.stage_planned("edit", 3)
        progress.stage_planned("audio", 0)  # nothing to do: no bar
        assert set(ids) == {"edit"}
        # What a stage task's progress callback does for each finished item.
        stage_task._item_listener("edit", "computed")
        stage_task._item_listener("edit", "failed")
        assert bars.tasks[0].completed == 2
        progress.batch_finished("edit", 3)  # a batch summary from another process
        assert bars.tasks[0].completed == 3 and bars.tasks[0].total == 3
    assert progress._active is None and stage_task._item_listener is None
    progress.item_finished("edit", "computed")  # no bars: nothing happens, nothing raises
