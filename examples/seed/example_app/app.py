"""The app: what WalEx's ``config :walex, WalEx, ...`` says, as a WalEx object.

The connection comes from the environment (``WALEX_URL``, or ``WALEX_HOSTNAME``,
``WALEX_USERNAME``, ``WALEX_PASSWORD``, ``WALEX_PORT``, ``WALEX_DATABASE``), so
that no password is written in the code.
"""

from walex import WalEx

app = WalEx.from_env(
    name="example_app",
    publication="events",
    subscriptions=["user_account", "todo"],
    # durable_slot=True is the default: a restart resumes where it left off.
)
