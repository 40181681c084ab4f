"""The aiobotocore client configuration ``SqsBroker`` uses, and the per-request work it drops.

The client library's per-request work (botocore, aiohttp) is nearly all of the client's CPU
per message on an SQS-compatible server (benchmarks/README.md, "SQS, eighth round"). Two
parts of it do nothing for the requests oncely makes, and cost over a quarter of it:

- **The User-Agent.** botocore (>= 1.31) assembles its header from a dozen components, each
  sanitised character by character, twice per request (once for the request, once more in a
  ``request-created`` handler): ~0.9M instructions per API call, 21% of the client's CPU per
  message. Its content never changes for a client, so oncely gives botocore's documented
  ``Config(user_agent=...)`` one string made here once. It names oncely and the SDK versions
  and keeps the app id a user set (``AWS_SDK_UA_APP_ID`` / ``sdk_ua_app_id``) to find their
  traffic; the session's ``user_agent_extra`` is still appended by botocore (aiobotocore's
  session sets it to ``botocore/<version>``). Dropped are botocore's feature letters
  (``m/...``) and ``cfg/retry-mode``, read only by AWS's statistics.
- **Parameter validation.** botocore walks every request against the service model again
  before serialising it: ~0.24M instructions per call, 6%. oncely builds every parameter it
  sends: queue names, ids and attribute names are checked by ``_sqs_wire`` (with messages
  naming the limit), numbers are clamped to SQS's ranges, receipt handles are sent as
  received, and mypy checks each call against ``types-aiobotocore-sqs``. A user's input never
  reaches botocore unchecked, so the validator could only report oncely's own bug.
"""

from __future__ import annotations

import platform
import re

import aiobotocore
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession

from oncely._version import __version__
from oncely.brokers._sqs_options import SqsOptions

__all__ = ["client_config", "user_agent"]

# What botocore keeps of a user's app id (its sanitiser's allowed characters, "#" included).
_NOT_UA = re.compile(r"[^A-Za-z0-9!$%&'*+\-.^_`|~#]")


def user_agent(session: AioSession) -> str:
    """The User-Agent of every request, fixed when the client is made."""
    parts = [
        f"oncely/{__version__}",
        f"aiobotocore/{aiobotocore.__version__}",
        f"lang/python#{platform.python_version()}",
        f"os/{platform.system().lower() or 'other'}",
    ]
    appid = session.get_config_variable("user_agent_appid")
    if appid:
        parts.append(f"app/{_NOT_UA.sub('-', str(appid))}")
    return " ".join(parts)


def client_config(options: SqsOptions, session: AioSession) -> AioConfig:
    return AioConfig(
        retries={"mode": "standard", "max_attempts": 4},
        connect_timeout=5,
        read_timeout=options.wait + 15,
        max_pool_connections=max(32, 4 * options.max_pollers),
        user_agent=user_agent(session),
        parameter_validation=False,
    )
