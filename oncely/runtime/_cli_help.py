"""The text of ``oncely --help`` and each command's ``--help``, written for users."""

DESCRIPTION = """\
Run effectively-once message handlers, publish messages and manage dead letters.

Settings come from a TOML file (--config or $ONCELY_CONFIG), then ONCELY_* environment
variables, then these flags, each overriding the one before. The default broker is an
embedded SQLite queue in ./oncely.db; no server is needed."""

EPILOG = """\
examples:
  oncely run shop.tasks:app                         # the embedded SQLite queue
  oncely run shop.tasks:app --broker amqp://guest:guest@localhost/ --store sqlite:///keys.db
  oncely publish orders '{"id": "A1", "qty": 2}' --key A1
  oncely dlq list orders
  oncely dlq replay orders --id 3f2a...

Bad input (a bad module:app, URL, setting or JSON) prints one line and exits 2; a broker or
store failure exits 1. Run 'oncely COMMAND --help' for a command's options."""

RUN_HELP = """\
Import module:app and consume every handler's topic until SIGTERM or SIGINT.

The first signal stops fetching and lets in-flight handlers finish within the grace period;
a second one stops at once. If the module fails to import, its own traceback is shown,
followed by a one-line summary, and the exit status is 2."""

RUN_EPILOG = """\
examples:
  oncely run shop.tasks:app
  oncely run shop.tasks:app --concurrency 32 --grace 10
  oncely run shop.tasks:app --handler shop.tasks.place_order --config oncely.toml"""

PUBLISH_HELP = """\
Publish one message whose body is the given JSON, and print its message id."""

PUBLISH_EPILOG = """\
examples:
  oncely publish orders '{"id": "A1", "qty": 2}'
  oncely publish orders '{"id": "A1", "qty": 2}' --key A1 --delay 30
  oncely publish orders '[1, 2]' --header x-source=cli --broker sqlite:///jobs.db"""

DLQ_HELP = """\
List or replay the messages a topic's handlers dead-lettered (poison payloads, exhausted
retries, oncely.Reject)."""

DLQ_EPILOG = """\
examples:
  oncely dlq list orders --broker amqp://guest:guest@localhost/
  oncely dlq replay orders"""

DLQ_LIST_HELP = """\
Print a topic's dead letters, oldest first, one JSON object per line (id, attempt,
failed_at, reason, body, headers); the count goes to stderr."""

DLQ_LIST_EPILOG = """\
examples:
  oncely dlq list orders
  oncely dlq list orders --limit 10 | jq -r .reason"""

DLQ_REPLAY_HELP = """\
Move a topic's dead letters back to the topic, with their attempt count reset. An --id that
is not among them (misspelt, or already replayed) is reported and the exit status is 2."""

DLQ_REPLAY_EPILOG = """\
examples:
  oncely dlq replay orders                      # all of them
  oncely dlq replay orders --id ID1 --id ID2    # only these"""
