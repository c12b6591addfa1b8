"""The data path of one connection, past startup: a sans-I/O relay and its stages.

Where each part lives (a newcomer's map; docs/architecture.md draws it):

* :mod:`.core`: :class:`Session`, the relay. It frames both directions, forwards what
  nobody changes as slices, keeps the protocol state, and calls the stages;
* :mod:`.owed`: what the server still owes, one entry per forwarded message;
* :mod:`.records`: the prepared statements and portals, one record each;
* :mod:`.policy`: decisions, refusal sentinels and policy reloads;
* :mod:`.hold`: a request held on the wire until its approval;
* :mod:`.masking`: mask plans, result descriptions and row layouts;
* :mod:`.row_limit`: counting rows, cutting and cancelling a result over the limit;
* :mod:`.audit`: the write-ahead request records and the result records.

The I/O shell (:mod:`querywarden.server`) owns the sockets and awaits what a stage cannot
decide at once; nothing here does I/O.
"""

from querywarden.session.core import LARGE_MESSAGE, Mode, Session
from querywarden.session.policy import SENTINEL_PREFIX
from querywarden.session.row_limit import RowLimit

__all__ = ["LARGE_MESSAGE", "SENTINEL_PREFIX", "Mode", "RowLimit", "Session"]
