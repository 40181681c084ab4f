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
  oncely dlq purge orders --older-than 7d

Bad input (a bad module:app, URL, setting or JSON) prints one line and exits 2; a broker or
store failure exits 1. Run 'oncely COMMAND --help' for a command's options."""

RUN_HELP = """\
Import module:app and consume every handler's topic until SIGTERM or SIGINT.

The first signal stops fetching and lets in-flight handlers finish within the grace period;
a second one stops at once (exit status 1 if a handler ignored its cancel and was left
running). If the module fails to import, its own traceback is shown,
followed by a one-line summary, and the exit status is 2; a handler that oncely refuses (a
sync function, a wrong signature) is one line naming the file and line, exit status 2.

Logs go to stderr: JSON lines when it is not a terminal, readable lines when it is
(--log-format). Lines about a message carry its handler, topic, message_id, key and attempt;
payloads are left out unless --log-payloads. --log-level sets oncely's loggers only."""

RUN_EPILOG = """\
examples:
  oncely run shop.tasks:app
  oncely run shop.tasks:app --concurrency 32 --grace 10
  oncely run shop.tasks:app --handler shop.tasks.place_order --config oncely.toml
  oncely run shop.tasks:app --log-format json 2>&1 | jq 'select(.level == "ERROR")'"""

PUBLISH_HELP = """\
Publish one message whose body is the given JSON, and print its message id."""

PUBLISH_EPILOG = """\
examples:
  oncely publish orders '{"id": "A1", "qty": 2}'
  oncely publish orders '{"id": "A1", "qty": 2}' --key A1 --delay 30
  oncely publish orders '[1, 2]' --header x-source=cli --broker sqlite:///jobs.db"""

DLQ_HELP = """\
Inspect and act on the messages a topic's handlers dead-lettered (poison payloads, exhausted
retries, oncely.Reject): list them, show one, replay them to the topic, purge old ones.

On a TTY, list prints a table, replays show progress and purges a status line on stderr;
otherwise list and show print JSON (one object per line) with stable keys, and nothing else
goes to stdout but the result line of replay and purge."""

DLQ_EPILOG = """\
examples:
  oncely dlq list orders --broker amqp://guest:guest@localhost/
  oncely dlq show orders 3f2a...
  oncely dlq replay orders --all --rate 50/s
  oncely dlq purge orders --older-than 7d"""

DLQ_LIST_HELP = """\
Print a topic's dead letters, oldest first: id, attempt, age, last error (the reason) and
first error. A table on a TTY; otherwise one JSON object per line with the keys id, topic,
reason, attempt, first_error, last_error, failed_at, age_s, body, body_encoding, headers.
last_error is the reason; first_error is the first failed attempt's error, carried through
retries on memory, SQLite, RabbitMQ and Kafka (oncely-first-error), and null where it is not
known (SQS, for a message that failed more than once). The count goes to stderr."""

DLQ_LIST_EPILOG = """\
examples:
  oncely dlq list orders
  oncely dlq list orders --limit 10 | jq -r .reason"""

DLQ_SHOW_HELP = """\
Print one dead letter with its headers and body. The body is shown as UTF-8 text when it
decodes, else as base64 (and says so). JSON when stdout is not a TTY. An id that is not a
dead letter of the topic exits 2."""

DLQ_SHOW_EPILOG = """\
examples:
  oncely dlq show orders 3f2a...
  oncely dlq show orders 3f2a... | jq -r .body"""

DLQ_REPLAY_HELP = """\
Move dead letters back to the topic, with their attempt count reset and the headers
oncely-replayed-at and oncely-replay-count set. Say which: --id (repeatable) or --all (the
dead letters there when the command starts). --rate throttles. An interrupted replay loses
nothing: what moved stays moved and the rest stay dead letters; on RabbitMQ and SQS a crash
at the wrong moment can leave one message both replayed and still listed. An --id that is
not a dead letter (misspelt, or already replayed) is reported and the exit status is 2."""

DLQ_REPLAY_EPILOG = """\
examples:
  oncely dlq replay orders --id ID1 --id ID2    # only these
  oncely dlq replay orders --all --rate 20/s    # all of them, 20 a second"""

DLQ_PURGE_HELP = """\
Delete dead letters dead-lettered longer ago than --older-than (30s, 15m, 12h, 7d), or all of
them with --all --yes. On Kafka a purge hides them behind marker records; the log keeps them
until the DLQ topic's retention removes them."""

DLQ_PURGE_EPILOG = """\
examples:
  oncely dlq purge orders --older-than 7d
  oncely dlq purge orders --all --yes"""
