"""ExampleApp.TodoEvent: every change of todo, with archived rows left out."""

from walex import Event

from .app import app


def log_it(event: Event) -> None:
    # A function of the pipeline: runs on each event after the handler.
    print(f"todo_{event.type}_logged: {event.id}", flush=True)


@app.on_event(
    "todo",
    unwatched_fields={"updated_at"},  # a touch of updated_at alone is not news
    unwatched_records={"status": "archived"},  # nor is anything about archived todos
    exclude_columns={"updated_at"},
    functions=[log_it],
)
def todo_changed(event: Event) -> None:  # one event at a time, in a worker thread
    if event.type == "update":
        print("todo_update_event:", event.changes, flush=True)
    else:
        print(f"todo_{event.type}_event:", event.record, flush=True)
