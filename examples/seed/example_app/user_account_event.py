"""ExampleApp.UserAccountEvent: inserts, updates and deletes of user_account."""

from walex import Event

from .app import app


@app.on_insert("user_account")
async def user_account_insert(events: list[Event]) -> None:
    for event in events:
        # do something with the new user_account: send a welcome email, say
        print("user_account_insert_event:", event.new_record, flush=True)


@app.on_update("user_account", unwatched_fields={"updated_at"})
async def user_account_update(events: list[Event]) -> None:
    for event in events:
        print("user_account_update_event:", event.changes, flush=True)


@app.on_delete("public.user_account")  # the relation can name its schema
async def user_account_delete(events: list[Event]) -> None:
    for event in events:
        print("user_account_delete_event:", event.old_record, flush=True)
