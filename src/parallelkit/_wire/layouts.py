"""Every fixed byte layout of the wire, in one place.

Each framed message of the package starts with one of these headers, then a spec per
out-of-band buffer; what the fields mean, and which buffers follow, is documented by the
module that speaks the layout (named on each).  They are the inventory for the one frame
header the wire is heading to; keep new layouts here too.

No layout of the wire is defined outside this module.
"""

from __future__ import annotations

import struct
from typing import Final

# stream.py (Channel, pipelines, the pool): kind | pad | n buffers | body length, [id],
# n x buffer length
STREAM_HEAD: Final = struct.Struct("<BxxxIQ")  # kind, number of buffers, body length
STREAM_LEN: Final = struct.Struct("<Q")  # a buffer's length
STREAM_ID: Final = struct.Struct("<Q")  # the frame's id (when the kind has an id flag)

# _pipeline/messages.py (a pipeline message, in a stream frame's body): these fields, then the
# pickle; count (or position), busy ns, waiting ns, read-only bits of the buffers
PIPELINE_FIELDS: Final = struct.Struct("<qqqQ")

# the pool's TASK frame (_map.worker): the body starts with these, then the fn payload
# (fn len bytes, empty when the worker has the function) and the items payload
POOL_TASK: Final = struct.Struct("<qqqqq")  # fn id, flags, fn len, start, stop

# frames.py (Queue): a message's parts, its buffers apart
MESSAGE_HEAD: Final = struct.Struct("<qqqqqq")  # kind, f1, f2, f3, f4, number of buffers
MESSAGE_SPEC: Final = struct.Struct("<qq")  # size, writable

# arena.py (the pool's shared-memory arena)
# parent -> worker (after the fn payload, when the ARENA flag is set)
ARENA_ARG_HEAD: Final = struct.Struct("<qq")  # number of buffers, length of the segment name
ARENA_ARG_SPEC: Final = struct.Struct("<qq")  # offset, size
# worker -> parent
ARENA_RES_HEAD: Final = struct.Struct("<qqq")  # kept, number of buffers, names length
ARENA_RES_SPEC: Final = struct.Struct("<qqqq")  # segment index, offset, size, readonly

# direct.py (a pool reply whose large buffers the parent reads from the worker's memory)
DIRECT_HEAD: Final = struct.Struct("<q")  # number of buffers
DIRECT_SPEC: Final = struct.Struct("<QQ")  # address in the worker, size

# _queue/datagrams.py (a Queue message: one datagram of an AF_UNIX SOCK_DGRAM socketpair)
# kind | flags | number of parts | number of items | message id | body bytes; then the body
# (inline) or nothing (its file's descriptor rides along).  The body: QUEUE_SIZE per part,
# then the parts.
QUEUE_HEAD: Final = struct.Struct("<BBHIqQ")
QUEUE_SIZE: Final = struct.Struct("<Q")  # a part's length
